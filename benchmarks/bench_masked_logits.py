"""Logits only where a loss reads them: a loss over selected positions with `GPT.forward(logits_at=mask)` against the
same loss over the full (B, T, V) logits, same model, same batch, same run.

    python benchmarks/bench_masked_logits.py [--repeats 5] [--threads 2]

Two workloads of the default run, forward + backward on the `mini` model (vocabulary 4,096):
- a pretraining batch: 16 rows x 256 tokens, 4 rows of text (every token counts) and 12 task rows whose replies
  count (24.5% of their tokens, the share in the bundled task conversations); `masked_lm_loss` against
  `cross_entropy_loss(model(ids), targets, mask)`;
- a GRPO batch: 64 rows x 48 tokens, the last 11 of each row a reply; `response_token_logprobs` against the same
  log-probs gathered from the full logits.
Prints seconds per forward + backward and the ratio (full / selected).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from scratchllm.config import model_preset
from scratchllm.model.gpt import GPT
from scratchllm.model.logprobs import response_token_logprobs, token_logprobs
from scratchllm.train.losses import cross_entropy_loss, masked_lm_loss


def seconds_per_call(fn: Callable[[], torch.Tensor], model: GPT, repeats: int) -> float:
    def once() -> None:
        model.zero_grad(set_to_none=True)
        fn().backward()

    once()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats


def full_logits_logprobs(model: GPT, ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The reference: every position projected onto the vocabulary, then the scored ones kept."""
    mask = response_mask[:, 1:]
    return token_logprobs(model(ids[:, :-1]), ids[:, 1:]) * mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(model_preset("mini", vocab_size=4096))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, mini model ({model.num_params():,} parameters)")
    print("| workload | counted positions | full logits (s) | logits_at (s) | speed-up |")
    print("|---|---:|---:|---:|---:|")

    ids = torch.randint(0, 4096, (16, 257))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    mask = torch.ones(16, 256, dtype=torch.bool)
    mask[4:] = torch.rand(12, 256) < 0.245
    full = seconds_per_call(lambda: cross_entropy_loss(model(inputs), targets, mask), model, args.repeats)
    selected = seconds_per_call(lambda: masked_lm_loss(model, inputs, targets, mask), model, args.repeats)
    print(f"| pretraining batch 16 x 256 | {mask.float().mean():.0%} | {full:.3f} | {selected:.3f} | {full / selected:.2f}x |")

    ids = torch.randint(0, 4096, (64, 48))
    response = torch.zeros(64, 48, dtype=torch.bool)
    response[:, -11:] = True
    weights = torch.randn(64, 47)
    full = seconds_per_call(lambda: (full_logits_logprobs(model, ids, response) * weights).sum(), model, args.repeats)
    selected = seconds_per_call(lambda: (response_token_logprobs(model, ids, response)[0] * weights).sum(), model,
                                args.repeats)
    print(f"| GRPO batch 64 x 48 | {response[:, 1:].float().mean():.0%} | {full:.3f} | {selected:.3f} | {full / selected:.2f}x |")


if __name__ == "__main__":
    main()
