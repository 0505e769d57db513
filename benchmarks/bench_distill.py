"""Distillation vs. no teacher: the same student, seed, data and steps, with and without the teacher's soft targets.

    python benchmarks/bench_distill.py [--teacher runs/default/pretrain/final] [--steps 150] [--alpha 0.5] [--temperature 1]

Without --teacher it uses runs/default/pretrain/final when present, else pretrains a `mini` teacher for
--teacher-time-s seconds first. Both students run through the real `distill` stage (alpha=1 is plain CE, the
teacher never runs) and are scored on the whole held-out split: prints both bits-per-byte and the difference.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from scratchllm.train.stages import distill, pretrain

DEFAULT_TEACHER = Path("runs/default/pretrain/final")
# The student: `mini` narrowed to d_model 128 × 4 layers, 4 heads / 2 KV heads (every head count spelled out, so a
# change to the preset's own heads cannot make the shape invalid).
DEFAULT_STUDENT = ["--model.d_model=128", "--model.n_layers=4", "--model.n_heads=4", "--model.n_kv_heads=2"]


def get_teacher(arg: Path | None, out: Path, teacher_time_s: float) -> Path:
    if arg is not None:
        return arg
    if DEFAULT_TEACHER.exists():
        return DEFAULT_TEACHER
    print(f"[bench] no teacher at {DEFAULT_TEACHER}: pretraining a mini teacher for {teacher_time_s:.0f}s")
    tokenizer = Path("runs/default/tokenizer/tokenizer.json")
    pretrain.run(out / "teacher", preset="mini", tokenizer=tokenizer if tokenizer.exists() else None,
                 overrides=[f"--loop.max_time_s={teacher_time_s}", "--loop.device=cpu", "--loop.checkpoint_every=0"])
    return out / "teacher" / "pretrain" / "final"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None)
    parser.add_argument("--teacher-time-s", type=float, default=240.0)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--student", nargs="*", default=DEFAULT_STUDENT,
                        help="--model.* overrides of the mini preset that shape the student")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_distill_"))
    teacher = get_teacher(args.teacher, out, args.teacher_time_s)
    common = [f"--loop.max_steps={args.steps}", f"--loop.batch_size={args.batch_size}", f"--loop.seq_len={args.seq_len}",
              "--loop.max_time_s=0", "--loop.eval_every=0", "--loop.checkpoint_every=0", "--loop.eval_batches=1000",
              "--loop.device=cpu", "--loop.seed=1337", *args.student]
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} teacher={teacher} out={out}")
    results = {}
    for name, alpha in (("distilled", args.alpha), ("no teacher", 1.0)):
        root = out / name.replace(" ", "_")
        shards = teacher.parent / "shards"  # the teacher's own token shards, reused when the tokenizer matches
        if shards.exists() and not (root / "distill" / "shards").exists():
            shutil.copytree(shards, root / "distill" / "shards")
        start = time.perf_counter()
        results[name] = distill.run(root, teacher, student_preset="mini",
                                    overrides=common + [f"--distill.alpha={alpha}", f"--distill.temperature={args.temperature}"])
        results[name]["wall_s"] = time.perf_counter() - start
    kd, ce = results["distilled"], results["no teacher"]
    print(f"\nteacher held-out bpb {kd['teacher_val_bpb']:.4f}")
    print(f"student, distilled (alpha={args.alpha}, T={args.temperature}): held-out bpb {kd['val_bpb']:.4f}   "
          f"({kd['steps']} steps, {kd['wall_s']:.0f}s)")
    print(f"student, no teacher (alpha=1, plain CE):       held-out bpb {ce['val_bpb']:.4f}   "
          f"({ce['steps']} steps, {ce['wall_s']:.0f}s)")
    diff = kd["val_bpb"] - ce["val_bpb"]
    print(f"difference distilled - no teacher: {diff:+.4f} bpb ({100 * diff / ce['val_bpb']:+.2f}%)")


if __name__ == "__main__":
    main()
