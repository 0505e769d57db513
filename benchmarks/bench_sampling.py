"""Seeded batch sampling: one vectorised inverse-CDF draw vs one torch.multinomial call per row.

    python benchmarks/bench_sampling.py [--rows 64 350 1400] [--vocab 4096]

Every row of a batch has its own seed, so its text does not depend on the rest of the batch (the server's
requests, PPO's and GRPO's rollouts, the pipeline's sampled evaluation). The engine draws each row's uniforms up
front from its generator and samples the whole batch with `sample_from_uniforms`; the reference is what it did
before, `torch.multinomial` once per row and step with that row's generator. Prints the time of one sampling
step for each and the ratio, then one end-to-end sampled generation with the engine (`mini` preset, 32 tokens).
"""

from __future__ import annotations

import argparse
import time

import torch

from scratchllm.config import model_preset
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import SamplingParams, sample_from_uniforms
from scratchllm.model.gpt import GPT


def per_row_multinomial(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.multinomial(probs[r : r + 1], 1, generator=g).squeeze(-1) for r, g in enumerate(generators)])


def best_of(fn, *args, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 350, 1400])
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} vocab={args.vocab}")
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab) * 3
        generators = [torch.Generator().manual_seed(r) for r in range(rows)]
        uniforms = torch.rand(rows, dtype=torch.float64)
        vectorised = best_of(sample_from_uniforms, logits, uniforms)
        reference = best_of(lambda lg, gens: per_row_multinomial(lg.softmax(-1), gens), logits, generators)
        print(f"rows={rows:5d}  one sampling step: inverse-CDF {vectorised * 1e3:7.2f} ms   per-row multinomial "
              f"{reference * 1e3:7.2f} ms   ratio {reference / vectorised:5.1f}x")
    torch.manual_seed(0)
    model = GPT(model_preset("mini", vocab_size=args.vocab)).eval()
    prompts = torch.randint(0, args.vocab, (350, 16)).tolist()
    start = time.perf_counter()
    generate_batch(model, prompts, 32, SamplingParams(temperature=1.0), seed=0)
    print(f"end to end: 350 seeded rows x 32 new tokens, mini preset: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
