"""The pipeline's report: loss curves per stage (PNG, matplotlib) and one comparison table in markdown.

Last step of the data flow: it only reads what the stages wrote (`<stage>/metrics.jsonl`) and the
comparison numbers computed by `eval/compare.py`, so it can be re-run on any finished run directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from scratchllm.config import GRPOConfig, PPOConfig

# Rows of the comparison table: (metric key, label, how to read it).
COMPARISON_ROWS: list[tuple[str, str, str]] = [
    ("val_bpb", "validation bits-per-byte", "lower is better; tokenizer-independent"),
    ("copy_accuracy", "in-context copy accuracy", "next-token accuracy on the 2nd copy of a repeated random "
     "sequence: the induction skill that reading a number from the prompt needs (Olsson et al. 2022)"),
    ("end_rate", "end-of-reply rate", "share of held-out chat prompts whose reply ends with <|im_end|>"),
    ("pass_at_1", "verifiable-task pass@1", "greedy decoding on the held-out task split; reference: each "
     "family's commonest training answer, question unread"),
    ("pass_at_1_vs_sft", "pass@1 change vs SFT", "held-out tasks won (wrong for SFT, right here) and lost; exact "
     "McNemar p: small means the change is not the luck of this task set (a second seed tests training noise)"),
    ("sampled_pass_at_1", "sampled task pass@1", f"{GRPOConfig().eval_samples} replies per task at temperature "
     f"{GRPOConfig().temperature:g} on the first {GRPOConfig().sampled_eval_tasks} held-out tasks, mean right (pass@1 as "
     "DeepSeek-R1 estimates it): the sampling policy GRPO optimises; reference as above"),
    ("sampled_pass_at_1_vs_sft", "sampled pass@1 change vs SFT", "tasks whose share of right samples rose and fell "
     "(same random draws); exact sign-test p"),
    ("rm_accuracy", "reward-model pair accuracy", "held-out preference pairs ranked correctly"),
    ("learned_reward", "learned reward (mean)", "reward model score of greedy replies to held-out prompts"),
    ("gold_score", "gold-judge score (mean)", "rule-based judge the preference data was built from"),
    ("gold_vs_sft", "gold-judge change vs SFT", "held-out prompts whose reply the judge scores higher than SFT's, "
     "and lower; exact sign-test p (small: not the luck of these prompts)"),
    ("learned_reward_sampled", "learned reward, sampled replies", f"{PPOConfig().eval_samples} replies per held-out "
     f"prompt sampled at temperature {PPOConfig().temperature:g}, the distribution PPO maximises the reward over"),
    ("gold_score_sampled", "gold-judge score, sampled replies", "the same sampled replies, judged by the rules"),
    ("gold_sampled_vs_sft", "sampled gold change vs SFT", "sampled replies the judge scores higher than SFT's "
     "(same prompt, same random draws) and lower; exact sign-test p"),
    ("rm_judge_agreement_sampled", "reward model agrees with the judge", "pairs of sampled replies to one prompt "
     "that the judge scores differently, ordered the same way by the reward model: its accuracy where this policy "
     "samples; a fall after PPO means PPO moved to where the reward model is wrong (reward hacking)"),
    ("kl_to_sft", "KL to SFT (nats/token)", "exact KL(this model ‖ SFT) over the whole vocabulary at each token of "
     "the model's own greedy replies, averaged over tokens: never negative; 0 for SFT itself"),
]
# "reference": what a policy that never reads the question scores (eval/compare.py), beside the stages.
STAGE_COLUMNS = ["pretrain", "sft", "dpo", "ppo", "grpo", "reference"]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl file; a missing file is an empty history (stage skipped)."""
    if not path.exists():
        return []
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}); delete the line or the file") from err
    return rows


def _series(rows: Iterable[dict[str, Any]], key: str, split: str | None) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        if split is not None and row.get("split", "train") != split:
            continue
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in row:
            xs.append(float(row["step"]))
            ys.append(float(value))
    return xs, ys


def plot_stage_curves(run_dir: Path, stages: list[str], out_dir: Path) -> list[Path]:
    """One PNG per stage: the training loss and every eval metric the stage logged, against step."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the report is written on machines without a display
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for stage in stages:
        rows = read_metrics(run_dir / stage / "metrics.jsonl")
        if not rows:
            continue
        eval_keys = sorted(
            {k for r in rows if r.get("split") == "eval" for k, v in r.items() if isinstance(v, (int, float))}
            - {"step", "time_s"}
        )
        eval_keys = [k for k in eval_keys if "/" not in k]  # per-family / per-rule breakdowns stay in the JSON
        train_keys = [k for k in ("loss", "reward", "kl", "groups_with_signal") if _series(rows, k, "train")[0]]
        panels = [(k, "train") for k in train_keys] + [(k, "eval") for k in eval_keys]
        if not panels:
            continue
        n_cols = min(3, len(panels))
        n_rows = math.ceil(len(panels) / n_cols)
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.0 * n_rows), squeeze=False)
        for ax, (key, split) in zip(axes.flat, panels):
            xs, ys = _series(rows, key, split)
            ax.plot(xs, ys, marker="o" if split == "eval" else None, markersize=3, linewidth=1.2)
            ax.set_title(f"{stage}: {split} {key}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"{stage}_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _cell(text: str) -> str:
    """Text for a markdown table cell: a bare `|` (as in <|im_end|>) ends the cell early, and `<…>` may be
    taken for an HTML tag and hidden, so both are escaped."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def comparison_table(comparison: dict[str, dict[str, float | str | None]]) -> str:
    """Markdown table: rows are metrics, columns are stages, all on the same held-out sets."""
    columns = [s for s in STAGE_COLUMNS if s in comparison]
    lines = [
        "| metric | " + " | ".join(columns) + " | meaning |",
        "|---|" + "---:|" * len(columns) + "---|",
    ]
    for key, label, meaning in COMPARISON_ROWS:
        cells = [_fmt(comparison[stage].get(key)) for stage in columns]
        lines.append(f"| {_cell(label)} | " + " | ".join(cells) + f" | {_cell(meaning)} |")
    return "\n".join(lines)


def family_table(comparison: dict[str, dict[str, float | str | None]]) -> str:
    """Markdown table of held-out task pass@1 per family (rows) and stage (columns), with the reading-nothing
    reference: whether a stage's gain is reading or a better guess shows family by family."""
    columns = [s for s in STAGE_COLUMNS if s in comparison]
    families = sorted({k.split("/", 1)[1] for row in comparison.values() for k in row if k.startswith("pass_at_1/")})
    if not families:
        return ""
    lines = ["| family | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for family in families:
        cells = [_fmt(comparison[stage].get(f"pass_at_1/{family}")) for stage in columns]
        lines.append(f"| {_cell(family)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def before_after_table(run_dir: Path, stages: list[str]) -> str:
    """Markdown table of each stage's own held-out metrics at its first and last evaluation (step 0 = the model
    it started from), headline keys only (per-family breakdowns stay in metrics.jsonl)."""
    lines = ["| stage | metric | before | after |", "|---|---|---:|---:|"]
    for stage in stages:
        evals = [r for r in read_metrics(run_dir / stage / "metrics.jsonl") if r.get("split") == "eval"]
        if len(evals) < 2:
            continue
        first, last = evals[0], evals[-1]
        for key, value in last.items():
            if key in ("step", "split") or "/" in key or not isinstance(value, (int, float)):
                continue
            lines.append(f"| {stage} | {_cell(key)} | {_fmt(first.get(key))} | {_fmt(value)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def cost_table(stage_summaries: dict[str, dict[str, Any]], speed: dict[str, Any], comparison_s: float) -> str:
    """Markdown table of what each stage cost: steps, seconds, and the same in reference steps (this machine's
    time of one fixed training step, train/reference_step.py), split into training and the rest (evaluation,
    loading, saving), with the report's own measuring as one more row."""
    step_s = float(speed["reference_step_s"])
    lines = [f"One reference step took {step_s:.3f} s here ({speed.get('reference_tokens_per_s', 0):,} tokens/s, "
             f"{speed.get('device', '?')}, {speed.get('threads', '?')} threads, {speed.get('cpu', '?')}); "
             "reference steps compare across machines, seconds do not.", "",
             "| stage | steps | time (s) | reference steps | training (s) | evaluation and overhead (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    total = evaluation = 0.0
    for stage, summary in [*stage_summaries.items(), ("report", {"time_s": comparison_s})]:
        seconds = float(summary.get("time_s", 0.0))
        training = float(summary.get("train_seconds", 0.0))
        other = seconds - training
        total, evaluation = total + seconds, evaluation + other
        lines.append(f"| {stage} | {summary.get('steps', '—')} | {seconds:.1f} | {seconds / step_s:.0f} | "
                     f"{training:.1f} | {other:.1f} |")
    lines.append(f"| **all** | | {total:.1f} | {total / step_s:.0f} | {total - evaluation:.1f} | {evaluation:.1f} |")
    share = evaluation / total if total else 0.0
    lines += ["", f"Evaluation and overhead: {share:.0%} of the run's time."]
    return "\n".join(lines)


def write_report(
    run_dir: Path,
    comparison: dict[str, dict[str, float | str | None]],
    stage_summaries: dict[str, dict[str, Any]],
    chat_commands: list[str],
    speed: dict[str, Any] | None = None,
    comparison_s: float = 0.0,
) -> Path:
    """Write `run_dir/report.md` and the PNG plots beside it; returns the report path."""
    stages = list(stage_summaries)
    plots = plot_stage_curves(run_dir, stages, run_dir)
    lines = [f"# scratchllm run report: `{run_dir.name}`", ""]
    lines += ["## Comparison on the same held-out sets", "", comparison_table(comparison), ""]
    families = family_table(comparison)
    if families:
        lines += ["## Task pass@1 by family", "",
                  "Greedy, on the same held-out tasks; reference: each family's commonest training answer.", "",
                  families, ""]
    lines += ["## Stages", "", "| stage | time (s) | headline |", "|---|---:|---|"]
    for stage, summary in stage_summaries.items():
        headline = ", ".join(
            f"{k}={_fmt(v)}" for k, v in summary.items()
            if k != "time_s" and "/" not in k and isinstance(v, (int, float))
        )
        lines.append(f"| {stage} | {_fmt(summary.get('time_s'))} | {_cell(headline)} |")
    lines.append("")
    if speed:
        lines += ["## Cost", "", cost_table(stage_summaries, speed, comparison_s), ""]
    before_after = before_after_table(run_dir, stages)
    if before_after:
        lines += ["## Before and after, by each stage's own evaluation", "",
                  "Step 0 measures the model the stage started from, on that stage's held-out set.", "",
                  before_after, ""]
    if plots:
        lines += ["## Curves", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
        lines.append("")
    if chat_commands:
        lines += ["## Talk to each checkpoint", "", "```bash", *chat_commands, "```", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
