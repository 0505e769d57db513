"""INT8 weight-only inference vs float32 on one trained checkpoint: weight bytes, decode tokens/s, held-out bits-per-byte.

    python benchmarks/bench_int8.py [--checkpoint runs/default/pretrain/final] [--new 128] [--repeats 5]

Without --checkpoint it uses runs/default/pretrain/final when present, else pretrains a `mini` model for
--train-time-s seconds first. Every int8 kernel of scratchllm/infer/quantize.py is measured ("dequant": cast then
float matmul; "int8mm": torch's fused int8-weight matmul on bf16 activations; "auto", what `--quantize int8` uses:
int8mm for decode steps, dequant for longer inputs, so its bpb is dequant's). Decode timings interleave the
variants and keep each one's best of --repeats, since the CPU is shared with other jobs.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch

from scratchllm.data.batches import sequential_windows
from scratchllm.eval.metrics import evaluate_lm, token_byte_lengths
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.quantize import quantize_int8, weight_bytes
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.io import load_model
from scratchllm.train.stages import pretrain

DEFAULT_CHECKPOINT = Path("runs/default/pretrain/final")


def get_checkpoint(arg: Path | None, out: Path, train_time_s: float) -> Path:
    if arg is not None:
        return arg
    if DEFAULT_CHECKPOINT.exists():
        return DEFAULT_CHECKPOINT
    print(f"[bench] no checkpoint at {DEFAULT_CHECKPOINT}: pretraining a mini model for {train_time_s:.0f}s")
    tokenizer = Path("runs/default/tokenizer/tokenizer.json")
    pretrain.run(out, preset="mini", tokenizer=tokenizer if tokenizer.exists() else None,
                 overrides=[f"--loop.max_time_s={train_time_s}", "--loop.device=cpu", "--loop.checkpoint_every=0"])
    return out / "pretrain" / "final"


@torch.no_grad()
def decode_tokens_per_s(model, batch: int, n_new: int, vocab: int) -> float:
    prompts = torch.randint(0, vocab, (batch, 8), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    out, _ = generate_batch(model, prompts, n_new, SamplingParams(temperature=0))
    return sum(len(row) for row in out) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--train-time-s", type=float, default=240.0)
    parser.add_argument("--data-dir", type=Path, default=Path("corpus/pretrain"))
    parser.add_argument("--new", type=int, default=128, help="tokens decoded per timing")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_int8_"))
    checkpoint = get_checkpoint(args.checkpoint, out, args.train_time_s)
    model, tok, _ = load_model(checkpoint)
    cached = checkpoint.parent / "shards" / "val.bin"  # the pretraining run's own held-out shard, when it is there
    if cached.exists() and not (out / "shards" / "val.bin").exists():
        (out / "shards").mkdir(parents=True, exist_ok=True)
        shutil.copy(cached, out / "shards" / "val.bin")
    val = pretrain.shard_for(args.data_dir / "val", tok, out / "shards")
    variants = {
        "float32": model,
        "int8 dequant": quantize_int8(copy.deepcopy(model), kernel="dequant"),
        "int8 int8mm": quantize_int8(copy.deepcopy(model), kernel="int8mm"),
        "int8 auto": quantize_int8(copy.deepcopy(model), kernel="auto"),
    }
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} checkpoint={checkpoint} "
          f"params={model.num_params() / 1e6:.2f}M held-out tokens={len(val)}")
    token_bytes = token_byte_lengths(tok, tok.vocab_size)
    rows = {}
    for name, variant in variants.items():
        with torch.no_grad():
            bpb = evaluate_lm(variant, sequential_windows(val, 256, 16, 10_000), token_bytes)["val_bpb"]
        rows[name] = {"bytes": weight_bytes(variant), "bpb": bpb}
    for batch in args.batches:
        best = {name: 0.0 for name in variants}
        for _ in range(args.repeats):
            for name, variant in variants.items():
                best[name] = max(best[name], decode_tokens_per_s(variant, batch, args.new, tok.vocab_size))
        for name in variants:
            rows[name][f"tok/s b={batch}"] = best[name]
    base = rows["float32"]
    header = f"{'variant':<14} {'weight MB':>10} {'held-out bpb':>13} {'Δbpb':>8}" + "".join(
        f" {'decode tok/s b=' + str(b):>19}" for b in args.batches)
    print(header)
    for name, row in rows.items():
        line = f"{name:<14} {row['bytes'] / 1e6:>10.2f} {row['bpb']:>13.5f} {100 * (row['bpb'] / base['bpb'] - 1):>+7.3f}%"
        for b in args.batches:
            key = f"tok/s b={b}"
            line += f" {row[key]:>10.0f} ({row[key] / base[key]:4.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
