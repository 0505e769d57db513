"""`scratchllm eval-tasks A [B ...]`: held-out task pass@1 of checkpoints, per family, and whether a change is real.

Every checkpoint answers the same held-out tasks greedily (the pipeline's decoding). After the table, each
checkpoint after the first is paired with the first task by task: tasks won, lost, and the exact McNemar p
(eval/significance.py). Typical use, GRPO against the SFT model it started from:

    scratchllm eval-tasks runs/default/sft/final runs/default/grpo/final
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scratchllm.data.jsonl import read_tasks
from scratchllm.eval.chat_eval import constant_answer_by_family, pass_at_1_by_family, task_scores
from scratchllm.eval.significance import paired_change
from scratchllm.model.io import CheckpointError, load_model
from scratchllm.runtime import resolve_device


def evaluate_checkpoints(checkpoints: list[Path], tasks: list[dict], max_new_tokens: int, device: str) -> dict[str, list[float]]:
    """Per-task greedy scores of each checkpoint, keyed by its path as given."""
    dev = resolve_device(device)
    scores: dict[str, list[float]] = {}
    for path in checkpoints:
        model, tok, _ = load_model(path, dev)
        scores[str(path)] = task_scores(model, tok, tasks, max_new_tokens)
        print(f"[eval-tasks] {path}: pass@1 {sum(scores[str(path)]) / len(tasks):.3f}")
    return scores


def results_table(tasks: list[dict], scores: dict[str, list[float]], reference: dict[str, float]) -> str:
    """Markdown: one row per family (and all), one column per checkpoint, the reading-nothing reference last
    (`reference` keyed like `pass_at_1_by_family`)."""
    by_checkpoint = {name: pass_at_1_by_family(tasks, s) for name, s in scores.items()}
    families = sorted({t["family"] for t in tasks})
    sizes = {f: sum(t["family"] == f for t in tasks) for f in families}
    names = list(scores)
    lines = ["| family | tasks | " + " | ".join(f"({i + 1})" for i in range(len(names))) + " | reference |",
             "|---|---:|" + "---:|" * (len(names) + 1)]
    for label, key, n in [("all", "pass_at_1", len(tasks))] + [(f, f"pass_at_1/{f}", sizes[f]) for f in families]:
        cells = [f"{by_checkpoint[name][key]:.3f}" for name in names]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + f" | {reference[key]:.3f} |")
    lines += [""] + [f"({i + 1}) {name}" for i, name in enumerate(names)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scratchllm eval-tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="model directories; later ones are paired with the first")
    parser.add_argument("--data", type=Path, default=Path("corpus/chat"), help="holds tasks_val.jsonl and tasks_train.jsonl")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N held-out tasks only (0 = all)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write per-task scores and the comparisons here")
    args = parser.parse_args(argv)
    if len(set(args.checkpoints)) != len(args.checkpoints):
        parser.error("a checkpoint is listed twice")
    try:
        tasks = read_tasks(args.data / "tasks_val.jsonl")
        train_tasks = read_tasks(args.data / "tasks_train.jsonl")
        tasks = tasks[: args.limit] if args.limit > 0 else tasks
        scores = evaluate_checkpoints(args.checkpoints, tasks, args.max_new_tokens, args.device)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"scratchllm eval-tasks: {err}")
        return 2
    reference = constant_answer_by_family(train_tasks, tasks)
    print(results_table(tasks, scores, reference))
    names = list(scores)
    changes = {name: paired_change(scores[names[0]], scores[name]) for name in names[1:]}
    for i, change in enumerate(changes.values(), start=2):
        print(f"({i}) vs (1): {change.describe()}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "tasks": [t["id"] for t in tasks], "scores": scores, "reference": reference,
            "vs_first": {name: {"won": c.won, "lost": c.lost, "p_value": c.p_value} for name, c in changes.items()},
        }, indent=1))
    return 0
