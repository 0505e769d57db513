"""GGUF export time, and decode speed at batch 1: our engine against llama.cpp on the same weights.

    python benchmarks/bench_gguf.py [--preset mini] [--new-tokens 256] [--threads 1] [--checkpoint runs/x/sft/final]

A random-init model of the preset (vocab 4096, the pipeline's tokenizer size), or a trained `--checkpoint`, is
exported to F32, F16 and Q8_0 GGUF files; each export is timed. Then each engine decodes greedily from the same 16-token prompt, batch 1, with
a KV cache: ours (infer/engine.py generate_batch, float32) and llama.cpp (llama-cpp-python) on each file. Every
engine runs in a fresh process, so one library's OpenMP threads never spin beside the other's (tests/export/
test_gguf.py measured that at 80x). Q8_0 runs without llama.cpp's AMX/repack buffers, which segfault on this
machine kind (see test_gguf.open_llama). Prints one markdown table row per engine: whether its greedy tokens
equal ours, and the largest logit difference from ours over the prompt and our continuation. On a shared machine the wall-clock rate depends on the neighbours; the CPU-time
rate (tokens per second of this process's CPU time, time.process_time) does much less, and with one thread it is
what an idle core would give.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 4096
PROMPT = list(range(300, 316))


def build(preset: str, root: Path) -> Path:
    """A random model of `preset` + a small trained tokenizer, saved as a model directory (seeded)."""
    import torch

    from scratchllm.config import model_preset
    from scratchllm.model.gpt import GPT
    from scratchllm.model.io import save_model
    from scratchllm.tokenizer.bpe import Tokenizer

    corpus = Path(__file__).resolve().parents[1] / "corpus" / "pretrain" / "val" / "shakespeare.txt"
    tok = Tokenizer.train([corpus.read_text(encoding="utf-8")[:100_000]], 256 + 500 + 4, progress=False)
    torch.manual_seed(0)
    model = GPT(model_preset(preset, vocab_size=VOCAB)).eval()  # embedding rows past the tokenizer: UNUSED tokens
    return save_model(root / "final", model, tok, {})


def decode_ours(checkpoint: Path, new_tokens: int, threads: int, repeats: int,
                work: Path) -> tuple[float, float, list[int]]:
    import numpy as np
    import torch

    from scratchllm.infer.engine import generate_batch
    from scratchllm.infer.sampling import SamplingParams
    from scratchllm.model.io import load_model

    torch.set_num_threads(threads)
    model, _, _ = load_model(checkpoint)
    model.eval()
    times, cpu_times, ids = [], [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        out, _ = generate_batch(model, [PROMPT], new_tokens, SamplingParams(temperature=0))
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        ids = out[0]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + ids]))[0].numpy()  # (T, V), the reference for the llama.cpp runs
    np.save(work / "ours_logits.npy", logits)
    return new_tokens / statistics.median(times), new_tokens / statistics.median(cpu_times), ids


def decode_llama(path: Path, dtype: str, new_tokens: int, threads: int, repeats: int,
                 reference: list[int]) -> tuple[float, float, list[int], float]:
    from scratchllm.export.gguf import open_in_llama_cpp

    # AMX/repack buffers segfault here for Q8_0 (see the module docstring)
    llm = open_in_llama_cpp(path, extra_buffers=dtype != "q8_0", n_ctx=len(PROMPT) + new_tokens + 8, n_threads=threads,
                            n_threads_batch=threads, verbose=False, logits_all=True)
    times, cpu_times, ids = [], [], []
    for _ in range(repeats):
        llm.reset()
        started, cpu_started = time.perf_counter(), time.process_time()
        ids = []
        for token in llm.generate(PROMPT, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            ids.append(token)
            if len(ids) == new_tokens:
                break
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    error = logit_error(llm, reference, path.parent / "ours_logits.npy")
    return new_tokens / statistics.median(times), new_tokens / statistics.median(cpu_times), ids, error


def logit_error(llm, reference_ids: list[int], ours_logits_path: Path) -> float:
    """max |logit(llama.cpp) - logit(ours)| over PROMPT + our greedy continuation."""
    import numpy as np

    ours = np.load(ours_logits_path)
    llm.reset()
    llm.eval(PROMPT + reference_ids)
    return float(np.abs(np.array(llm.scores[: len(ours)]) - ours).max())


def tokenizer_agreement(gguf_path: Path, tok, max_docs: int = 300) -> None:
    """Per file of corpus/pretrain/val: documents llama.cpp tokenizes differently from us, and token counts.

    GGUF cannot carry our pre-tokenizer regex; llama.cpp uses its built-in "qwen2" one (export/gguf.py)."""
    from scratchllm.data.sources import iter_documents
    from scratchllm.export.gguf import open_in_llama_cpp

    llm = open_in_llama_cpp(gguf_path, vocab_only=True, verbose=False)
    print("\n| val file | documents | tokenized differently | tokens ours | tokens llama.cpp |\n|---|---:|---:|---:|---:|")
    for path in sorted((Path(__file__).resolve().parents[1] / "corpus" / "pretrain" / "val").glob("*.txt")):
        docs = list(iter_documents(path))[:max_docs]
        ours = [tok.encode(d) for d in docs]
        theirs = [llm.tokenize(d.encode(), add_bos=False, special=False) for d in docs]
        differ = sum(a != b for a, b in zip(ours, theirs))
        undecodable = [i for i, ids in enumerate(theirs) if llm.detokenize(ids).decode("utf-8", "replace") != docs[i]]
        assert not undecodable, f"{path.name}: llama.cpp's tokens of documents {undecodable[:5]} do not decode back"
        print(f"| {path.name} | {len(docs)} | {differ} | {sum(map(len, ours)):,} | {sum(map(len, theirs)):,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained model directory (default: random)")
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # internal: one engine per process
    parser.add_argument("--path", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:  # child process: decode and print JSON
        if args.engine == "ours":
            speed, cpu_speed, ids = decode_ours(args.path, args.new_tokens, args.threads, args.repeats, args.work)
            error = 0.0
        else:
            reference = json.loads((args.work / "ours_ids.json").read_text())
            speed, cpu_speed, ids, error = decode_llama(args.path, args.engine, args.new_tokens, args.threads,
                                                        args.repeats, reference)
        print(json.dumps({"tokens_per_s": speed, "tokens_per_cpu_s": cpu_speed, "ids": ids, "logit_error": error}))
        return

    from scratchllm.export.gguf import export_gguf
    from scratchllm.model.io import load_model

    root = Path(tempfile.mkdtemp(prefix="bench_gguf_"))  # every file this script writes goes here
    checkpoint = args.checkpoint or build(args.preset, root)
    model, tok, _ = load_model(checkpoint)
    print(f"{args.checkpoint or 'random ' + args.preset}: {model.num_params():,} parameters, vocab "
          f"{model.config.vocab_size}; batch 1, prompt {len(PROMPT)} tokens, {args.new_tokens} new tokens greedy, "
          f"{args.threads} thread(s), median of {args.repeats}\n")
    print("| file | export s | size MB |\n|---|---:|---:|")
    files = {}
    for dtype in ("f32", "f16", "q8_0"):
        started = time.perf_counter()
        files[dtype] = export_gguf(model, tok, root / f"model-{dtype}.gguf", dtype)
        print(f"| {dtype} | {time.perf_counter() - started:.2f} | {files[dtype].stat().st_size / 1e6:.1f} |")
    print("\n| engine | tok/s (wall) | tok/s (CPU time) | greedy tokens equal ours | max logit diff |")
    print("|---|---:|---:|---|---:|")
    runs = {"ours (float32)": ("ours", checkpoint), **{f"llama.cpp {d}": (d, files[d]) for d in files}}
    for label, (engine, path) in runs.items():
        cmd = [sys.executable, __file__, "--engine", engine, "--path", str(path), "--work", str(root),
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        if engine == "ours":
            (root / "ours_ids.json").write_text(json.dumps(result["ids"]))
            same, error = "reference", "-"
        else:
            same = str(result["ids"] == json.loads((root / "ours_ids.json").read_text()))
            error = f"{result['logit_error']:.2g}"
        print(f"| {label} | {result['tokens_per_s']:.0f} | {result['tokens_per_cpu_s']:.0f} | {same} | {error} |")
    tokenizer_agreement(files["f32"], tok)


if __name__ == "__main__":
    main()
