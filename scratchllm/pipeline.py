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
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scratchllm.config import TokenizerConfig, save_json
from scratchllm.errors import UserError

STAGES = ["tokenizer", "pretrain", "sft", "reward", "dpo", "ppo", "grpo", "report"]


class PipelineError(UserError, RuntimeError):
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
    parser = argparse.ArgumentParser(prog="scratchllm pipeline", description=__doc__,
                                     epilog=OVERRIDES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--work-scale", type=float, default=1.0,
                        help="multiply every training stage's number of steps (0.1 for a quick look; the figures "
                             "then differ from the README's)")
    parser.add_argument("--toy", action="store_true", help="toy scale for tests: tiny preset, a few steps per stage")
    args, extra = parser.parse_known_args(argv)
    if args.work_scale <= 0:
        parser.error(f"--work-scale must be positive, got {args.work_scale}")
    return args, extra


OVERRIDES_HELP = """config overrides:
  --section.key=value          to every stage that has the section (loop, optim, lora: every training stage;
                               model, data: pretrain; sft, reward, dpo, ppo, grpo: that stage)
  --stage.section.key=value    to one stage only, e.g. --sft.loop.max_steps=300 --pretrain.optim.lr=2e-3
  A wall-clock cap is an explicit option: --loop.max_time_s=60 stops each stage's training after 60 s."""

TRAINING_STAGES = ["pretrain", "sft", "reward", "dpo", "ppo", "grpo"]
# Config sections each training stage reads (its run() builds them): where a routed override may go.
STAGE_SECTIONS: dict[str, set[str]] = {
    "pretrain": {"loop", "optim", "lora", "model", "data"},
    **{stage: {"loop", "optim", "lora", stage} for stage in ("sft", "reward", "dpo", "ppo", "grpo")},
}
TOY_STEPS: dict[str, int] = {"pretrain": 6, "sft": 6, "reward": 6, "dpo": 4, "ppo": 3, "grpo": 3}
# What each stage costs on any machine, in reference steps (train/reference_step.py), measured from the default
# run in README.md (its report's cost table): the pipeline's estimate before a stage starts. Measured, not
# promised: a different preset or --work-scale changes them, and the pipeline prints what each stage took.
EXPECTED_REFERENCE_STEPS: dict[str, float] = {"tokenizer": 6, "pretrain": 325, "sft": 40, "reward": 38, "dpo": 28,
                                              "ppo": 60, "grpo": 189, "report": 66}


def route_overrides(extra: list[str]) -> dict[str, list[str]]:
    """`--section.key=value` to every training stage that has the section, `--stage.section.key=value` to that
    stage; anything no stage reads is refused here, before any work, rather than failing (or applying to one
    stage only) later."""
    routed: dict[str, list[str]] = {stage: [] for stage in TRAINING_STAGES}
    for raw in extra:
        text = raw.lstrip("-")
        dotted = text.split("=", 1)[0]
        parts = dotted.split(".")
        if "=" not in text or len(parts) < 2:
            raise PipelineError(f"unrecognised argument {raw!r}: overrides look like --section.key=value or "
                                "--stage.section.key=value (scratchllm pipeline --help)")
        if parts[0] in STAGE_SECTIONS and len(parts) == 3:
            stage, section = parts[0], parts[1]
            if section not in STAGE_SECTIONS[stage]:
                raise PipelineError(f"{raw!r}: the {stage} stage has no {section!r} section; it has "
                                    f"{sorted(STAGE_SECTIONS[stage])}")
            routed[stage].append("--" + text.split(".", 1)[1])
            continue
        targets = [stage for stage, sections in STAGE_SECTIONS.items() if parts[0] in sections]
        if len(parts) != 2 or not targets:
            raise PipelineError(f"{raw!r}: no stage has a {parts[0]!r} section; sections are "
                                f"{sorted(set().union(*STAGE_SECTIONS.values()))}, stages {TRAINING_STAGES}")
        for stage in targets:
            routed[stage].append("--" + text)
    return routed


def _stage_overrides(args: argparse.Namespace, stage: str, routed: dict[str, list[str]]) -> list[str]:
    """The pipeline's own settings for a stage, then the user's routed overrides (the later value wins)."""
    overrides = [f"--loop.device={args.device}"]
    if stage == "pretrain" and not args.toy:  # chat-format data from the first step (config.DataConfig.chat_data)
        chat = args.corpus / "chat"
        overrides += [f"--data.chat_data={chat / 'tasks_train.jsonl'}",
                      f"--data.eval_tasks={chat / 'tasks_val.jsonl'}"]
    if stage == "sft":
        overrides.append(f"--sft.pretrain_data={args.corpus / 'pretrain'}")
    if args.toy:
        overrides += [f"--loop.max_steps={TOY_STEPS[stage]}", "--loop.eval_every=0", "--loop.checkpoint_every=0"]
        overrides += ["--loop.eval_batches=2", "--loop.batch_size=4"]
        overrides += {"pretrain": ["--loop.seq_len=64"], "sft": ["--sft.eval_prompts=8", "--sft.eval_tasks=12", "--sft.pretrain_seq_len=32"],
                      "dpo": ["--dpo.eval_pairs=16", "--dpo.eval_prompts=8", "--dpo.eval_tasks=12"],
                      "ppo": ["--ppo.rollout_batch=4", "--ppo.eval_prompts=8", "--ppo.max_new_tokens=8"],
                      "grpo": ["--grpo.prompts_per_step=2", "--grpo.group_size=4", "--grpo.max_new_tokens=8",
                               "--grpo.eval_tasks=12"]}.get(stage, [])
    elif args.work_scale != 1.0:
        import importlib

        default_steps = importlib.import_module(f"scratchllm.train.stages.{stage}").DEFAULT_LOOP.max_steps
        overrides.append(f"--loop.max_steps={max(1, round(default_steps * args.work_scale))}")
    if stage == "ppo":  # the report samples every checkpoint's replies on the same draws; no need to do it twice
        overrides.append("--ppo.eval_samples=0")
    return overrides + routed.get(stage, [])


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def measure_speed(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """This machine's reference-step time (train/reference_step.py), measured once per run and kept in speed.json,
    so a resumed run's estimates and report use the same unit."""
    from scratchllm.runtime import resolve_device
    from scratchllm.train.reference_step import measure_reference_step, reference_tokens_per_s

    path = root / "speed.json"
    if path.exists() and not args.fresh:
        return json.loads(path.read_text())
    device = str(resolve_device(args.device))
    step_s = measure_reference_step(steps=1, warmup=1, device=device) if args.toy else measure_reference_step(device=device)
    speed = {"reference_step_s": round(step_s, 4), "reference_tokens_per_s": round(reference_tokens_per_s(step_s)),
             "device": device, "threads": torch_threads(), "cpu": platform.processor() or platform.machine()}
    save_json(path, speed)
    return speed


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


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
    try:
        routed = route_overrides(extra)
    except PipelineError as err:
        print(f"scratchllm pipeline: {err}", file=sys.stderr)
        return 2
    preset = "tiny" if args.toy else args.preset
    root = args.runs_dir / args.name
    root.mkdir(parents=True, exist_ok=True)
    chat_dir = args.corpus / "chat"
    summaries: dict[str, dict[str, Any]] = {}
    from scratchllm.data.sources import data_fingerprint

    # the data's bytes are an input too: a run made from other files under the same names is never "done"
    upstream_key = _hash_inputs(preset, args.vocab_size, args.toy, data_fingerprint([args.corpus]))
    speed = measure_speed(root, args)
    step_s = speed["reference_step_s"]
    pending = [s for s in STAGES if s in selected and (args.fresh or not (root / s / "DONE.json").exists())]
    expected = {s: EXPECTED_REFERENCE_STEPS[s] * (args.work_scale if s in TRAINING_STAGES else 1) * step_s
                for s in pending}
    print(f"[pipeline] this machine: one reference step (train/reference_step.py) takes {step_s:.2f} s "
          f"({speed['reference_tokens_per_s']:,} tokens/s, {speed['device']}, {speed['threads']} threads)")
    if expected and not args.toy:
        plan = ", ".join(f"{s} ~{_minutes(t)}" for s, t in expected.items())
        print(f"[pipeline] expected: {plan}; in all ~{_minutes(sum(expected.values()))}")

    def run_stage(stage: str, fn: Callable[[bool], dict[str, Any]]) -> None:
        nonlocal upstream_key
        stage_dir = root / stage
        key = _hash_inputs(upstream_key, stage, _stage_overrides(args, stage, routed) if stage in TRAINING_STAGES else [])
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
        summary["reference_steps"] = round(summary["time_s"] / step_s, 1)
        stage_dir.mkdir(parents=True, exist_ok=True)
        _mark_done(stage_dir, key, summary)
        summaries[stage] = summary
        shown = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and "/" not in k}
        print(f"[pipeline] {stage} done: {json.dumps(shown)}", flush=True)
        expected.pop(stage, None)
        if expected and not args.toy:
            print(f"[pipeline] {stage} took {_minutes(summary['time_s'])} = {summary['reference_steps']:.0f} reference "
                  f"steps; about {_minutes(sum(expected.values()))} left", flush=True)

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
            overrides=_stage_overrides(args, "pretrain", routed),
            resume=resume,
        )

    run_stage("pretrain", pretrain_stage)

    def post_stage(stage: str, init_from: str, **kwargs: Any) -> Callable[[bool], dict[str, Any]]:
        def fn(resume: bool) -> dict[str, Any]:
            import importlib

            module = importlib.import_module(f"scratchllm.train.stages.{stage}")
            return module.run(
                root, final(init_from), data_dir=chat_dir, overrides=_stage_overrides(args, stage, routed), resume=resume,
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
        comparison_s = time.perf_counter() - start
        report = write_report(root, comparison, summaries, chat_commands, speed=speed, comparison_s=comparison_s)
        total_s = comparison_s + sum(summary.get("time_s", 0.0) for summary in summaries.values())
        print(f"[pipeline] report written in {time.perf_counter() - start:.0f}s: {report}")
        print(f"[pipeline] the run's stages and report: {_minutes(total_s)} = {total_s / step_s:.0f} reference steps "
              f"of {step_s:.2f} s")
        print("\nTalk to a checkpoint:\n  " + "\n  ".join(chat_commands))
    return 0
