"""Decode throughput with and without the KV cache (full recompute each step), batch 1 and 8.

    python benchmarks/bench_decode.py [--preset mini] [--new 256 1024]

Without the cache every step re-runs the whole sequence (quadratic in length); with it each step is one
position (linear). Prints tokens/s and the ratio cache / no-cache in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from scratchllm.config import model_preset
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.gpt import GPT


@torch.no_grad()
def no_cache(model: GPT, prompts: torch.Tensor, n_new: int) -> None:
    ids = prompts
    for _ in range(n_new):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--new", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    cfg = model_preset(args.preset, vocab_size=4096, max_seq_len=max(args.new) + 16)
    model = GPT(cfg).eval()
    greedy = SamplingParams(temperature=0)
    print(f"torch={torch.__version__} preset={args.preset} params={model.num_params() / 1e6:.2f}M")
    for batch in args.batches:
        for n_new in args.new:
            prompts = torch.randint(0, 4096, (batch, 8))
            start = time.perf_counter()
            generate_batch(model, prompts.tolist(), n_new, greedy)
            cached = batch * n_new / (time.perf_counter() - start)
            start = time.perf_counter()
            no_cache(model, prompts, n_new)
            plain = batch * n_new / (time.perf_counter() - start)
            print(f"batch={batch:2d} new={n_new:5d}  kv-cache {cached:8.0f} tok/s   recompute {plain:8.0f} tok/s   "
                  f"ratio {cached / plain:6.1f}x")


if __name__ == "__main__":
    main()
