"""`scratchllm pipeline`: tokenizer → pretrain → SFT → reward model → PPO → GRPO (and DPO beside PPO).

The main job a newcomer runs first. Every stage writes `runs/<name>/<stage>/` and a `DONE.json`
marker; a second invocation skips finished stages and continues an interrupted one from its last
checkpoint, `--only`/`--skip-*` pick stages, and the run ends by measuring every checkpoint on the same
held-out sets and writing `report.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scratchllm.config import TokenizerConfig, save_json

STAGES = ["tokenizer", "pretrain", "sft", "reward", "dpo", "ppo", "grpo", "report"]


class PipelineError(RuntimeError):
    """A stage could not run because an earlier artefact is missing or stale."""


def _hash_inputs(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _done(stage_dir: Path, key: str) -> dict[str, Any] | None:
    """The stage's DONE.json if it finished with the same inputs, else None (stale or unfinished)."""
    marker = stage_dir / "DONE.json"
    if not marker.exists():
        return None
    data = json.loads(marker.read_text())
    return data if data.get("inputs") == key else None


def _mark_done(stage_dir: Path, key: str, summary: dict[str, Any]) -> None:
    save_json(stage_dir / "DONE.json", {"inputs": key, "summary": summary})


def _interrupted(stage_dir: Path, key: str) -> bool:
    """Whether a run of this stage with the same inputs started, wrote a checkpoint and did not finish."""
    from scratchllm.train.checkpoint import latest_checkpoint

    marker = stage_dir / "STARTED.json"
    return (marker.exists() and json.loads(marker.read_text()).get("inputs") == key
            and latest_checkpoint(stage_dir / "checkpoints") is not None)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="scratchllm pipeline", description=__doc__)
    parser.add_argument("--name", default="default", help="run name: everything goes to runs/<name>/")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--preset", default="mini", help="model preset (tiny for a toy run, mini for CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--corpus", type=Path, default=Path("corpus"), help="bundled data directory")
    parser.add_argument("--vocab-size", type=int, default=TokenizerConfig().vocab_size)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    for stage in STAGES:
        parser.add_argument(f"--skip-{stage}", action="store_true", help=f"skip the {stage} stage")
    parser.add_argument("--fresh", action="store_true", help="redo every selected stage even if finished")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply every stage's time budget (0.1 for a quick look)"
    )
    parser.add_argument("--toy", action="store_true", help="toy scale for tests: tiny preset, a few steps per stage")
    return parser.parse_known_args(argv)


# Default time budgets (seconds) per stage on the 2-core CPU. With eval, the report and start-up, three full runs
# at 215 s of pretraining took 14:44, 14:52 and 15:01 (README): no margin. Faster evaluation (finished rows leave
# the generation batch, length-sorted scoring, DPO's reference scored once) took ~40 s off the stages' overhead and
# the report, and pretraining gives up 10 s more, for a margin of about a minute.
# PPO has twice the time of earlier runs: in 68 steps (70 s) its learned reward on sampled replies rose for one
# seed of two on the README run's models, in 136 it rose for both seeds on two runs' models (docs/ppo.md).
BUDGET_S: dict[str, float] = {"pretrain": 205, "sft": 130, "reward": 80, "dpo": 35, "ppo": 140, "grpo": 100}
TOY_STEPS: dict[str, int] = {"pretrain": 6, "sft": 6, "reward": 6, "dpo": 4, "ppo": 3, "grpo": 3}


def _stage_overrides(args: argparse.Namespace, stage: str) -> list[str]:
    overrides = [f"--loop.device={args.device}"]
    if stage == "sft":
        overrides.append(f"--sft.pretrain_data={args.corpus / 'pretrain'}")
    if args.toy:
        overrides += [f"--loop.max_steps={TOY_STEPS[stage]}", "--loop.eval_every=0", "--loop.checkpoint_every=0"]
        overrides += ["--loop.eval_batches=2", "--loop.batch_size=4"]
        overrides += {"pretrain": ["--loop.seq_len=64"], "sft": ["--sft.eval_prompts=8", "--sft.eval_tasks=11", "--sft.pretrain_seq_len=32"],
                      "dpo": ["--dpo.eval_pairs=16", "--dpo.eval_prompts=8", "--dpo.eval_tasks=11"],
                      "ppo": ["--ppo.rollout_batch=4", "--ppo.eval_prompts=8", "--ppo.max_new_tokens=8"],
                      "grpo": ["--grpo.prompts_per_step=2", "--grpo.group_size=4", "--grpo.max_new_tokens=8",
                               "--grpo.eval_tasks=11"]}.get(stage, [])
    else:
        overrides.append(f"--loop.max_time_s={BUDGET_S[stage] * args.time_scale:g}")
    if stage == "ppo":  # the report samples every checkpoint's replies on the same draws; no need to do it twice
        overrides.append("--ppo.eval_samples=0")
    return overrides


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    selected = [s for s in STAGES if not getattr(args, f"skip_{s}")]
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(STAGES))
        if unknown:
            print(f"scratchllm pipeline: unknown stage(s) {unknown}; choose from {STAGES}", file=sys.stderr)
            return 2
        selected = [s for s in selected if s in wanted]
    preset = "tiny" if args.toy else args.preset
    root = args.runs_dir / args.name
    root.mkdir(parents=True, exist_ok=True)
    chat_dir = args.corpus / "chat"
    summaries: dict[str, dict[str, Any]] = {}
    upstream_key = _hash_inputs(preset, args.vocab_size, args.toy, extra)

    def run_stage(stage: str, fn: Callable[[bool], dict[str, Any]]) -> None:
        nonlocal upstream_key
        stage_dir = root / stage
        key = _hash_inputs(upstream_key, stage, args.time_scale)
        upstream_key = key
        if stage not in selected:
            previous = _done(stage_dir, key)
            if previous:
                summaries[stage] = previous["summary"]
            return
        previous = None if args.fresh else _done(stage_dir, key)
        if previous is not None:
            print(f"[pipeline] {stage}: already done, skipping (use --fresh to redo)")
            summaries[stage] = previous["summary"]
            return
        print(f"\n[pipeline] ===== {stage} =====", flush=True)
        resume = not args.fresh and _interrupted(stage_dir, key)
        if resume:
            print(f"[pipeline] {stage}: continuing the interrupted run from its last checkpoint")
        else:
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # another run's: never resume from them
            save_json(stage_dir / "STARTED.json", {"inputs": key})
        start = time.perf_counter()
        summary = dict(fn(resume))
        summary["time_s"] = round(time.perf_counter() - start, 1)
        stage_dir.mkdir(parents=True, exist_ok=True)
        _mark_done(stage_dir, key, summary)
        summaries[stage] = summary
        shown = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        print(f"[pipeline] {stage} done: {json.dumps(shown)}", flush=True)

    tokenizer_path = root / "tokenizer" / "tokenizer.json"

    def tokenizer_stage(resume: bool) -> dict[str, Any]:  # nothing to resume: retraining is quick
        from scratchllm.tokenizer.cli import train_tokenizer_from_files

        paths = sorted((args.corpus / "pretrain" / "train").glob("*.txt"))
        if not paths:
            raise PipelineError(f"no training text under {args.corpus / 'pretrain' / 'train'}")
        vocab = 512 if args.toy else args.vocab_size
        tok = train_tokenizer_from_files(paths, vocab, tokenizer_path)
        return {"vocab_size": tok.vocab_size}

    run_stage("tokenizer", tokenizer_stage)

    def final(stage: str) -> Path:
        path = root / stage / "final"
        if not path.exists():
            raise PipelineError(f"{stage} has no final checkpoint at {path}; run the {stage} stage first")
        return path

    def pretrain_stage(resume: bool) -> dict[str, Any]:
        from scratchllm.train.stages import pretrain

        return pretrain.run(
            root,
            preset=preset,
            tokenizer=tokenizer_path,
            data_dir=args.corpus / "pretrain",
            overrides=_stage_overrides(args, "pretrain") + extra,
            resume=resume,
        )

    run_stage("pretrain", pretrain_stage)

    def post_stage(stage: str, init_from: str, **kwargs: Any) -> Callable[[bool], dict[str, Any]]:
        def fn(resume: bool) -> dict[str, Any]:
            import importlib

            module = importlib.import_module(f"scratchllm.train.stages.{stage}")
            return module.run(
                root, final(init_from), data_dir=chat_dir, overrides=_stage_overrides(args, stage), resume=resume,
                **kwargs,
            )

        return fn

    run_stage("sft", post_stage("sft", "pretrain"))
    run_stage("reward", post_stage("reward", "sft"))
    run_stage("dpo", post_stage("dpo", "sft"))
    run_stage("ppo", post_stage("ppo", "sft", reward_model=root / "reward" / "final"))
    run_stage("grpo", post_stage("grpo", "sft"))

    if "report" in selected:
        from scratchllm.eval.compare import compare_checkpoints
        from scratchllm.eval.report import write_report

        print("\n[pipeline] ===== report: measuring every checkpoint on the same held-out sets =====")
        start = time.perf_counter()
        checkpoints = {s: root / s / "final" for s in ("pretrain", "sft", "dpo", "ppo", "grpo")}
        comparison = compare_checkpoints(
            {s: p for s, p in checkpoints.items() if p.exists()},
            reward_model=root / "reward" / "final",
            data_dir=args.corpus,
            quick=args.toy,
            device=args.device,
        )
        save_json(root / "comparison.json", comparison)
        chat_commands = [f"scratchllm chat --checkpoint {p}" for s, p in checkpoints.items() if p.exists()]
        report = write_report(root, comparison, summaries, chat_commands)
        print(f"[pipeline] report written in {time.perf_counter() - start:.0f}s: {report}")
        print("\nTalk to a checkpoint:\n  " + "\n  ".join(chat_commands))
    return 0
