"""Held-out task metrics: sampled pass@1 is the mean of k scored samples; pass@k asks for any right one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

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
    # Per task and sample, in order: what the report pairs with SFT's, task by task.
    assert chat_eval.task_sampled_scores(None, None, TASKS, 2, 0.7, seed=5) == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]


def test_constant_answer_baseline_uses_each_familys_commonest_training_answer() -> None:
    from scratchllm.eval.chat_eval import constant_answer_scores

    def task(family: str, answer: str, lang: str = "en") -> dict:
        return {"family": family, "lang": lang, "answer": answer, "verifier": "math",
                "prompt": [{"role": "user", "content": "?"}]}

    train = [task("add", "3"), task("add", "3"), task("add", "5"), task("compare", "9")]
    held_out = [task("add", "3"), task("add", "5", "zh"), task("compare", "9"), task("sort", "1")]
    # add -> "3" (right once of twice), compare -> "9" (right), sort never seen in training (wrong)
    assert sum(constant_answer_scores(train, held_out)) / 4 == 2 / 4


def test_copy_accuracy_is_one_for_a_copier_and_near_zero_for_a_model_that_ignores_context() -> None:
    import torch
    from torch import nn

    from scratchllm.eval.metrics import copy_accuracy

    V, L = 1000, 24  # a large V keeps tokens within one half distinct, so the last earlier match is the right one

    class Copier(nn.Module):  # predicts the token that followed the same token earlier in the row
        def __init__(self) -> None:
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(1))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*ids.shape, V)
            for b in range(ids.shape[0]):
                for t in range(ids.shape[1]):
                    earlier = [s for s in range(t) if ids[b, s] == ids[b, t] and s + 1 <= t]
                    if earlier:
                        logits[b, t, ids[b, earlier[-1] + 1]] = 1.0
            return logits

    class Unigram(Copier):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, V).index_fill_(-1, torch.tensor([7]), 1.0)

    # random halves may repeat a token, so a perfect copier still scores slightly below 1
    assert copy_accuracy(Copier(), V, n_sequences=8, length=L) > 0.9
    assert copy_accuracy(Unigram(), V, n_sequences=8, length=L) < 0.1


def test_constant_answer_by_family_has_the_keys_of_pass_at_1_by_family() -> None:
    from scratchllm.eval.chat_eval import constant_answer_by_family, pass_at_1_by_family

    def task(family: str, answer: str) -> dict:
        return {"family": family, "lang": "en", "answer": answer, "verifier": "math", "prompt": []}

    train = [task("add", "3"), task("add", "3"), task("compare", "9")]
    held_out = [task("add", "3"), task("add", "4"), task("compare", "9")]
    reference = constant_answer_by_family(train, held_out)
    assert reference == {"pass_at_1": 2 / 3, "pass_at_1/add": 0.5, "pass_at_1/compare": 1.0}
    assert reference.keys() == pass_at_1_by_family(held_out, [0.0, 0.0, 0.0]).keys()


def test_replies_are_memoised_on_the_weights_and_recomputed_when_they_change(monkeypatch, tiny_config) -> None:
    from scratchllm.model.gpt import GPT
    from scratchllm.tokenizer.bpe import Tokenizer

    tok = Tokenizer.train(["The answer is 12. user assistant " * 20], vocab_size=256 + 20 + 4, progress=False)
    model = GPT(dataclasses.replace(tiny_config, vocab_size=tok.vocab_size))
    prompts = [t["prompt"] for t in TASKS]
    calls = []
    real = chat_eval._generate_replies
    monkeypatch.setattr(chat_eval, "_generate_replies", lambda *args: calls.append(1) or real(*args))
    first = chat_eval.generate_replies(model, tok, prompts, 6)
    assert chat_eval.generate_replies(model, tok, prompts, 6) == first and len(calls) == 1  # same weights: reused
    chat_eval.generate_replies(model, tok, prompts, 6, seed=3, params=chat_eval.SamplingParams(temperature=1.0))
    assert len(calls) == 2  # other decoding: generated
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # one weight changed: the replies may change, so they are generated again
    assert chat_eval.generate_replies(model, tok, prompts, 6) == real(model, tok, prompts, 6, 64, chat_eval.SamplingParams(temperature=0.0), None)
    assert len(calls) == 3
