"""Per-token log-probs with gradients, as DPO, PPO and GRPO take them: `model.logprobs.token_logprobs` against
the same row-by-row computation that picks rows by indexing, same run.

    python benchmarks/bench_logprobs.py [--batch 8 32 64] [--seq 48] [--vocab 4096] [--repeats 5]

Forward + backward of sum(weights * token_logprobs(logits, targets)) on random float32 logits; prints seconds per
call and the ratio. Indexing `logits[b]` makes each row's backward zero-fill a gradient of the whole (B, T, V)
tensor, so its cost grows with B²; `unbind` writes each row's gradient once.
"""

from __future__ import annotations

import argparse
import time

import torch

from scratchllm.model.logprobs import token_logprobs


def indexed_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: the same row-by-row float32 log-softmax, rows taken as logits[b]."""
    out = torch.empty(targets.shape, dtype=torch.float32)
    for b in range(logits.shape[0]):
        row = logits[b].float()
        out[b] = row.gather(-1, targets[b, :, None]).squeeze(-1) - torch.logsumexp(row, dim=-1)
    return out


def seconds_per_call(fn, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, repeats: int) -> float:
    def once() -> None:
        logits.grad = None
        (fn(logits, targets) * weights).sum().backward()

    once()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--seq", type=int, default=48, help="prompt + reply tokens of a GRPO rollout row")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seq {args.seq}, vocab {args.vocab}")
    print("| batch | indexed rows (s) | unbind rows (s) | speed-up |")
    print("|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for batch in args.batch:
        logits = torch.randn(batch, args.seq, args.vocab, generator=g).requires_grad_()
        targets = torch.randint(0, args.vocab, (batch, args.seq), generator=g)
        weights = torch.randn(batch, args.seq, generator=g)
        old = seconds_per_call(indexed_rows, logits, targets, weights, args.repeats)
        new = seconds_per_call(token_logprobs, logits, targets, weights, args.repeats)
        print(f"| {batch} | {old:.3f} | {new:.3f} | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
