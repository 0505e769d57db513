"""What the stage tests share: fast loop flags and readers of a stage's metrics.jsonl (the tiny world and the SFT
model they start from are in tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path


def first_and_last_eval(stage_dir: Path) -> tuple[dict, dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    return evals[0], evals[-1]


def train_rows(stage_dir: Path) -> list[dict]:
    """The training rows of an RL stage's metrics.jsonl (those that log a rollout reward)."""
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train" and "reward" in r]
