"""Plumbing every stage command shares: common flags, config sections with overrides, the run template, summary.json.

A stage module defines `run(...)` (called in-process by the pipeline) as `run_stage` with its defaults and a
`build` that makes its model and stage, and a `main(argv)` built from `stage_main`, so
`scratchllm sft --init … --loop.max_steps=50` and the pipeline take the same path.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scratchllm.config import (
    LoopConfig,
    LoRAConfig,
    OptimConfig,
    apply_overrides,
    save_json,
    to_dict,
)
from scratchllm.train.checkpoint import resume_point
from scratchllm.train.loop import Stage, train


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators: a stage that builds a model, a head or LoRA adapters
    after this repeats itself bit for bit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_sections(defaults: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Stage defaults (dataclass instances) + `--section.key=value` overrides -> validated sections.

    Every stage calls this first, before it builds anything random, so it also seeds every generator with
    `--loop.seed` (a seed applied only when training starts comes after the model's initialisation)."""
    sections = apply_overrides(defaults, list(overrides or []))
    if "loop" in sections:
        seed_everything(sections["loop"].seed)
    return sections


def base_sections(loop: LoopConfig, optim: OptimConfig, **stage_sections: Any) -> dict[str, Any]:
    return {"loop": loop, "optim": optim, "lora": LoRAConfig(), **stage_sections}


def finish(stage_dir: Path, metrics: dict[str, Any], sections: dict[str, Any], started: float) -> dict[str, Any]:
    summary = {**metrics, "time_s": round(time.perf_counter() - started, 1)}
    save_json(stage_dir / "summary.json", {"summary": summary, "config": to_dict(sections)})
    return summary


def run_stage(run_root: Path, name: str, defaults: dict[str, Any], overrides: list[str] | None, resume: bool,
              build: Callable[[dict[str, Any]], tuple[nn.Module, Stage, Any]], started: float | None = None,
              ) -> dict[str, Any]:
    """The template every stage's `run` shares: resolve the config (seeding every generator first), build
    (model, stage, tokenizer) from it, train in <run_root>/<name>, write summary.json. `started`: when the
    command began, if it did work before this (pretraining's tokenizer, distillation's teacher)."""
    started = time.perf_counter() if started is None else started
    stage_dir = Path(run_root) / name
    sections = resolve_sections(defaults, overrides)
    model, stage, tokenizer = build(sections)
    metrics = train(model, stage, sections["optim"], sections["loop"], stage_dir, resume=resume, tokenizer=tokenizer,
                    config_sections=sections)
    return finish(stage_dir, metrics, sections, started)


def stage_main(
    argv: list[str], prog: str, run: Callable[..., dict[str, Any]], needs_init: bool = True,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    parser = argparse.ArgumentParser(
        prog=f"scratchllm {prog}",
        description=f"{run.__doc__ or ''}\nAny config field can be overridden: --loop.max_steps=100 --optim.lr=1e-3 …",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"), help="run root: writes <run-dir>/" + prog)
    if needs_init:
        parser.add_argument("--init", type=Path, required=True, help="model directory to start from")
    parser.add_argument("--data-dir", type=Path, default=None, help="data directory (default: the bundled corpus)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this stage")
    if extra_args:
        extra_args(parser)
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "." in o.split("=", 1)[0] and "=" in o)]
    if bad:
        parser.error(f"unrecognised arguments {bad}; config overrides look like --section.key=value")
    passed = ("run_dir", "data_dir", "resume") + (("init",) if needs_init else ())  # the rest go to run() by name
    kwargs = {k: v for k, v in vars(args).items() if k not in passed}
    if args.data_dir is not None:
        kwargs["data_dir"] = args.data_dir
    if args.resume:  # before any data is read: a mistyped --run-dir is refused at once (CheckpointError)
        resume_point(args.run_dir / prog / "checkpoints")
    # a ConfigError (or any other UserError) reaches scratchllm/__main__.py, the one place that prints it
    if needs_init:
        summary = run(args.run_dir, args.init, overrides=overrides, resume=args.resume, **kwargs)
    else:
        summary = run(args.run_dir, overrides=overrides, resume=args.resume, **kwargs)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, indent=2))
    return 0
