"""Mixture-of-Experts vs dense at equal ACTIVE parameters, trained the same steps on the bundled corpus, same run.

    OMP_NUM_THREADS=1 python benchmarks/bench_moe.py [--steps 200] [--d-model 128] [--n-layers 4] [--d-ff 384]

Variants (same seed, same batches, same optimizer and schedule, through `scratchllm.train.loop.train`):
  dense      one SwiGLU of width F per layer
  moe4-top1  4 experts of width F, top-1: a token uses one F-wide MLP, like dense (Switch, arXiv:2101.03961)
  moe8-top2  8 experts of width F/2, top-2: again F hidden units per token (finer experts, arXiv:2401.06066)
Every MoE variant costs the dense model's MLP FLOPs per token plus a d_model×E router. Prints held-out
bits-per-byte (the whole val split), training tokens/s, each MoE's ratio to dense, and how balanced its
routing ended (largest share of tokens one expert received; 1/E is perfect balance).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from scratchllm.config import LoopConfig, ModelConfig, OptimConfig
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.cli import train_tokenizer_from_files
from scratchllm.train.loop import train
from scratchllm.train.stages.pretrain import PretrainStage, shard_for


def active_params(model: GPT) -> int:
    """Parameters one token uses: all of them, minus the routed experts it was not sent to."""
    cfg = model.config
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return model.num_params() - (routed - routed * cfg.n_experts_active // cfg.n_experts if cfg.n_experts else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=384, help="F: the dense MLP width = hidden units active per token")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--variants", default="dense,moe4-top1,moe8-top2")
    parser.add_argument("--data", type=Path, default=Path("corpus/pretrain"))
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_moe"), help="tokenizer + shards, reused")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    F = args.d_ff
    variants = {
        "dense": dict(d_ff=F),
        "moe4-top1": dict(d_ff=F, n_experts=4, n_experts_active=1, d_ff_expert=F),
        "moe8-top2": dict(d_ff=F, n_experts=8, n_experts_active=2, d_ff_expert=F // 2),
    }
    chosen = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in chosen if v not in variants]:
        parser.error(f"unknown variants {unknown}; choose from {list(variants)}")

    tok_path = args.cache / "tokenizer.json"
    train_tokenizer_from_files(sorted((args.data / "train").glob("*.txt")), args.vocab_size, tok_path, progress=False)
    tok = Tokenizer.load(tok_path)
    train_tokens = shard_for(args.data / "train", tok, args.cache / "shards")
    val_tokens = shard_for(args.data / "val", tok, args.cache / "shards")
    n_val_batches = (len(val_tokens) - 1) // args.seq // args.batch + 1  # every held-out window
    loop = LoopConfig(max_steps=args.steps, batch_size=args.batch, seq_len=args.seq, eval_every=0,
                      eval_batches=n_val_batches, checkpoint_every=0, keep_checkpoints=1, log_every=50,
                      device=args.device)
    optim = OptimConfig(lr=args.lr, warmup_steps=max(1, args.steps // 10))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}; "
          f"{len(train_tokens) / 1e6:.2f}M train / {len(val_tokens) / 1e3:.0f}k val tokens, vocab {tok.vocab_size}; "
          f"{args.steps} steps x {args.batch} x {args.seq} tokens")

    results: dict[str, dict[str, float]] = {}
    for name in chosen:
        cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=4,
                          n_kv_heads=2, max_seq_len=args.seq, **variants[name])
        torch.manual_seed(0)
        model = GPT(cfg)
        stage = PretrainStage(train_tokens, val_tokens, tok, loop)  # same seed: the same batches for every variant
        with tempfile.TemporaryDirectory() as run_dir:
            started = time.perf_counter()
            metrics = train(model, stage, optim, loop, Path(run_dir))
            wall = time.perf_counter() - started
            rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        # Largest share of routed tokens any expert got in any layer at the last logged step: 1/E = balanced.
        share = next((r["moe_max_expert_fraction"] for r in reversed(rows) if "moe_max_expert_fraction" in r), None)
        results[name] = {
            "total": model.num_params(), "active": active_params(model), "val_bpb": metrics["val_bpb"],
            "tokens_per_s": metrics["steps"] * args.batch * args.seq / metrics["train_seconds"], "wall_s": wall,
            "max_share": share,
        }

    print(f"\n{'variant':<11} {'params':>9} {'active':>9} {'val bpb':>8} {'train tok/s':>12} "
          f"{'bpb vs dense':>13} {'tok/s vs dense':>15} {'max expert share':>17}")
    base = results.get("dense")
    for name, r in results.items():
        rel_bpb = f"{r['val_bpb'] / base['val_bpb']:.3f}" if base else "-"
        rel_tps = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        print(f"{name:<11} {r['total'] / 1e6:8.2f}M {r['active'] / 1e6:8.2f}M {r['val_bpb']:8.3f} "
              f"{r['tokens_per_s']:12,.0f} {rel_bpb:>13} {rel_tps:>15} "
              f"{'-' if r['max_share'] is None else format(r['max_share'], '.3f'):>17}")


if __name__ == "__main__":
    main()
