"""GRPO's held-out evaluation pairs every later greedy pass@1 with the first one, task by task."""

from __future__ import annotations

import pytest
from torch import nn

from scratchllm.config import GRPOConfig
from scratchllm.train.stages import grpo

TASKS = [{"id": str(i), "family": "add" if i < 4 else "sort", "answer": "1", "verifier": "math", "prompt": []}
         for i in range(8)]


def test_later_evaluations_report_tasks_won_lost_and_mcnemar_p_against_the_first(monkeypatch) -> None:
    evaluations = iter([[1, 0, 0, 0, 1, 0, 0, 0],  # step 0
                        [1, 1, 1, 1, 0, 1, 1, 0]])  # later: 5 won, 1 lost
    monkeypatch.setattr(grpo, "task_scores", lambda model, tok, tasks, max_new_tokens: [float(s) for s in next(evaluations)])
    cfg = GRPOConfig(eval_samples=0, curriculum=False)
    stage = grpo.GRPOStage(None, nn.Linear(1, 1), TASKS, TASKS, cfg, seed=0)
    first = stage.evaluate(nn.Linear(1, 1))
    assert first["pass_at_1"] == 0.25 and "pass_at_1_p" not in first
    # A resumed run keeps the step-0 scores, so its later evaluations are paired with the same baseline.
    resumed = grpo.GRPOStage(None, nn.Linear(1, 1), TASKS, TASKS, cfg, seed=0)
    resumed.load_state_dict(stage.state_dict())
    later = resumed.evaluate(nn.Linear(1, 1))
    assert later["pass_at_1"] == 0.75 and later["pass_at_1/add"] == 1.0 and later["pass_at_1/sort"] == 0.5
    assert (later["pass_at_1_won"], later["pass_at_1_lost"]) == (5.0, 1.0)
    assert later["pass_at_1_p"] == pytest.approx(2 * 7 / 64)  # 2 * P(X <= 1), X ~ Bin(6, 1/2)
