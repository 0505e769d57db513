"""Batched generation when replies end at different steps: what the pipeline's evaluation does hundreds of times.

    python benchmarks/bench_generation.py [--prompts 1050] [--max-new-tokens 32] [--mean-reply 12]

The evaluation batches prompts of similar length (less left padding to prefill) and the engine drops finished
rows from the batch once a quarter of it has stopped. The reference, measured in the same run, does neither:
prompts batched in the order given, finished rows kept to the end (`drop_finished=False`). A random `mini` model has no end token of its own, so a share of the vocabulary stops a reply
(`--mean-reply` tokens on average), and prompt lengths are drawn from 8 to 36 tokens, as chat prompts are here.
Both paths sample with the same per-prompt seeds; the script prints how many replies came out identical.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from scratchllm.config import model_preset
from scratchllm.data.chat_batches import length_sorted_chunks
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.gpt import GPT


def generate_all(model: GPT, prompts: list[list[int]], max_new: int, stop: set[int], sort: bool, drop: bool,
                 batch: int = 64) -> list[list[int]]:
    chunks = (length_sorted_chunks([len(p) for p in prompts], batch) if sort
              else [list(range(start, min(start + batch, len(prompts)))) for start in range(0, len(prompts), batch)])
    out: list[list[int]] = [[] for _ in prompts]
    for chunk in chunks:
        ids, _ = generate_batch(model, [prompts[i] for i in chunk], max_new, SamplingParams(temperature=1.0), stop,
                                seed=list(chunk), drop_finished=drop)
        for i, row in zip(chunk, ids):
            out[i] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=1050, help="1,050 = the report's sampled replies per checkpoint")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--mean-reply", type=int, default=12, help="average reply length in tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(model_preset("mini", vocab_size=4096)).eval()
    vocab = model.config.vocab_size
    stop = set(range(0, vocab, args.mean_reply))  # ~1/mean_reply of the mass under a near-uniform random model
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(8, 36))] for _ in range(args.prompts)]
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} prompts={args.prompts} "
          f"max_new_tokens={args.max_new_tokens}")
    generate_all(model, prompts[:64], args.max_new_tokens, stop, True, True)  # warm-up
    timings, outputs = {}, {}
    for name, sort, drop in (("engine", True, True), ("reference", False, False)):
        start = time.perf_counter()
        outputs[name] = generate_all(model, prompts, args.max_new_tokens, stop, sort, drop)
        timings[name] = time.perf_counter() - start
    lengths = [len(r) for r in outputs["engine"]]
    same = sum(a == b for a, b in zip(outputs["engine"], outputs["reference"]))
    print(f"mean reply {sum(lengths) / len(lengths):.1f} tokens; identical replies {same}/{len(prompts)}")
    print(f"engine (length-sorted, finished rows dropped) {timings['engine']:.2f} s   reference (given order, rows "
          f"kept) {timings['reference']:.2f} s   ratio {timings['reference'] / timings['engine']:.2f}x")


if __name__ == "__main__":
    main()
