"""Pretraining hyper-parameter sweep at a fixed wall-clock budget: width vs depth, learning rate, batch, sequence length.

    python scripts/sweep_pretrain.py --tokenizer runs/default/tokenizer/tokenizer.json [--budget-s 60] [--only NAME ...]

Every variant trains `mini` from scratch for the same number of seconds on the bundled corpus (one change from
the defaults each) and reports held-out bits-per-byte; on a CPU the budget, not the step count, is what a user
has, so a wider model that takes fewer steps is judged fairly. Run it on an otherwise idle machine: a second job
on the cores halves every variant's steps. Runs go to a temporary directory unless --out is given.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from scratchllm.train.stages import pretrain

# name -> overrides on top of the pretrain defaults (mini: d_model 384, 3 layers, 12 heads / 6 kv, lr 3e-3,
# batch 16 x 256 tokens). Shapes are spelled out in full, so a variant means the same model whatever mini is;
# d_head = 32 throughout. "d256 L6" was mini until the first sweep showed the wider, shallower shape ahead.
SHAPES: dict[str, tuple[int, int]] = {"d192 L10": (192, 10), "d256 L6": (256, 6), "d320 L4": (320, 4),
                                      "d384 L3": (384, 3), "d512 L2": (512, 2)}
VARIANTS: dict[str, list[str]] = {
    "default": [],
    **{name: [f"--model.d_model={d}", f"--model.n_layers={layers}", f"--model.n_heads={d // 32}",
              f"--model.n_kv_heads={d // 64}"] for name, (d, layers) in SHAPES.items()},
    "lr 1e-3": ["--optim.lr=1e-3"],
    "lr 6e-3": ["--optim.lr=6e-3"],
    "batch 8": ["--loop.batch_size=8"],
    "batch 32": ["--loop.batch_size=32"],
    "seq 128, batch 32": ["--loop.seq_len=128", "--loop.batch_size=32"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json (e.g. from `make run`)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="training seconds per variant")
    parser.add_argument("--only", nargs="+", default=None, help=f"variants to run (default: all of {list(VARIANTS)})")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        results = []
        for name in names:
            overrides = VARIANTS[name] + [f"--loop.max_time_s={args.budget_s}",
                                          "--loop.eval_every=0", "--loop.checkpoint_every=0"]
            run_dir = root / name.replace(" ", "_").replace(",", "")
            summary = pretrain.run(run_dir, tokenizer=args.tokenizer, overrides=overrides)
            results.append((name, summary))
            print(f"[sweep] {name}: val_bpb {summary['val_bpb']:.3f} after {summary['steps']} steps", flush=True)
    print(f"\n| variant | overrides | steps in {args.budget_s:.0f} s | val bpb |")
    print("|---|---|---:|---:|")
    for name, summary in results:
        shown = " ".join(VARIANTS[name]) or "—"
        print(f"| {name} | `{shown}` | {summary['steps']} | {summary['val_bpb']:.3f} |")


if __name__ == "__main__":
    main()
