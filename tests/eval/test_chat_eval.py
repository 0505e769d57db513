"""Held-out task metrics: sampled pass@1 is the mean of k scored samples; pass@k asks for any right one."""

from __future__ import annotations

import pytest

from scratchllm.eval import chat_eval

TASKS = [{"id": str(i), "family": "add", "verifier": "math", "answer": str(i), "prompt": [{"role": "user", "content": "?"}]}
         for i in range(3)]


def test_sampled_pass_at_1_averages_samples_and_pass_at_k_takes_any(monkeypatch) -> None:
    # Task 0: both samples right; task 1: one of two; task 2: none.
    replies = ["The answer is 0.", "The answer is 0.", "The answer is 1.", "The answer is 7.", "no", "The answer is 9."]
    seen: dict = {}

    def fake_generate_replies(model, tok, prompts, max_new_tokens, params=None, seed=None):
        seen.update(n=len(prompts), temperature=params.temperature, seed=seed)
        return [(r, True) for r in replies]

    monkeypatch.setattr(chat_eval, "generate_replies", fake_generate_replies)
    result = chat_eval.task_sampled_pass_at_1(None, None, TASKS, samples=2, temperature=0.7, seed=5)
    assert result["sampled_pass_at_1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert result["sampled_pass_at_2"] == pytest.approx(2 / 3)
    assert seen == {"n": 6, "temperature": 0.7, "seed": 5}
