"""GRPO raises a learnable reward; dynamic sampling, verifier weights, GRPO-ptx; the learnability curriculum and
the held-out evaluation paired with the first one."""

from __future__ import annotations

import copy
import random
from collections import Counter

import pytest
import torch
from torch import nn

from scratchllm.config import ConfigError, GRPOConfig
from scratchllm.data.chat_batches import render_sft, sft_batch
from scratchllm.data.jsonl import read_conversations, read_tasks
from scratchllm.model.io import load_model
from scratchllm.train.stages import grpo
from scratchllm.train.stages.grpo import FamilyCurriculum
from tests.conftest import FAST
from tests.train.stages.conftest import train_rows


def test_grpo_raises_a_trivially_learnable_reward(sft_model, monkeypatch, tmp_path) -> None:
    root, data = sft_model
    monkeypatch.setattr(grpo, "composite_reward", lambda text, task, weights: float(text.startswith("The")))
    grpo.run(tmp_path, root / "sft" / "final", data, FAST + ["--loop.max_steps=20", "--optim.lr=3e-3", "--grpo.prompts_per_step=4",
                                                            "--grpo.group_size=6", "--grpo.max_new_tokens=6"])
    rows = train_rows(tmp_path / "grpo")
    rewards = [r["reward"] for r in rows]
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert before <= 0.9, before  # room to learn, or the check below says nothing
    assert after >= before + 0.5 * (1 - before), (before, after)  # closes at least half the gap to always-rewarded
    assert all("groups_with_signal" in r for r in rows)


def test_grpo_single_update_takes_pi_old_from_the_loss_forward_with_the_same_loss_and_gradient(sft_model) -> None:
    # epochs = 1 skips the no-grad forward for π_old: the update must be the one a separate π_old gives.
    root, data = sft_model
    model, tok, _ = load_model(root / "sft" / "final")
    tasks = read_tasks(data / "tasks_train.jsonl")
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=6, max_draws=2)
    stage = grpo.GRPOStage(tok, model, copy.deepcopy(model), tasks, tasks[:4], cfg, seed=0,
                           reward_fn=lambda text, task: float(len(text) % 2))
    batch = stage._rollout_batch()
    assert batch["old_logprobs"] is None
    with torch.no_grad():
        old = grpo.response_token_logprobs(model, batch["ids"], batch["response_mask"])[0]
    results = []
    for old_logprobs in (None, old):
        loss, stats = stage.loss(model, {**batch, "old_logprobs": old_logprobs})
        results.append((loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]), stats))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and stats_a["ratio_mean"] == pytest.approx(1.0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))
    assert any(g.abs().sum() > 0 for g in grads_a)  # the batch had signal: the comparison is not of two zeros
    assert batch["ref_logprobs"] is None and "kl" not in stats_a  # β = 0 (the default): no reference pass
    with_kl = grpo.GRPOStage(tok, model, copy.deepcopy(model), tasks, tasks[:4], GRPOConfig(**{**vars(cfg), "kl_coef": 0.05}),
                             seed=0, reward_fn=lambda text, task: float(len(text) % 2))
    batch = with_kl._rollout_batch()
    assert batch["ref_logprobs"].shape == batch["response_mask"][:, 1:].shape
    assert with_kl.loss(model, batch)[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference before any step


def test_grpo_dynamic_sampling_fills_the_batch_with_groups_that_carry_signal(sft_model) -> None:
    root, data = sft_model
    model, tok, _ = load_model(root / "sft" / "final")
    all_tasks = read_tasks(data / "tasks_train.jsonl")
    add = [t for t in all_tasks if t["family"] == "add"]
    tasks = add + [t for t in all_tasks if t["family"] != "add"][: len(add)]  # half the draws can carry signal
    # Only `add` tasks can give a group mixed rewards; every other group is all-zero and must be left out.
    reward_fn = lambda text, task: float(len(text) % 2) if task["family"] == "add" else 0.0
    cfg = GRPOConfig(group_size=4, prompts_per_step=3, max_new_tokens=6, max_draws=6, curriculum=False)
    stage = grpo.GRPOStage(tok, model, copy.deepcopy(model), tasks, tasks[:4], cfg, seed=0, reward_fn=reward_fn)
    batch = stage._rollout_batch()
    advantages = batch["advantages"].view(-1, cfg.group_size)
    assert batch["stats"]["draws"] > 1  # one draw of 3 tasks rarely holds 3 `add` groups
    assert len(advantages) <= cfg.prompts_per_step and (advantages.abs().sum(1) > 0).all()
    assert batch["ids"].shape[0] == batch["response_mask"].shape[0] == advantages.numel()


def test_grpo_verifiers_are_selected_by_their_weights() -> None:
    task = {"answer": "42", "verifier": "math", "lang": "en"}
    right_on_two_lines, wrong_but_tidy = "Let me think.\nThe answer is 42.", "The answer is 41."
    default = grpo.verifier_reward(GRPOConfig())  # correctness alone
    assert default(right_on_two_lines, task) == 1.0 and default(wrong_but_tidy, task) == 0.0
    format_only = grpo.verifier_reward(GRPOConfig(correct_weight=0.0, format_weight=1.0))
    assert format_only(right_on_two_lines, task) == 0.0 and format_only(wrong_but_tidy, task) == 1.0
    both = grpo.verifier_reward(GRPOConfig(correct_weight=1.0, format_weight=0.5))
    assert both("The answer is 42.", task) == 1.5 and both(wrong_but_tidy, task) == 0.5
    with pytest.raises(ConfigError, match="one of them must be > 0"):
        GRPOConfig(correct_weight=0.0, format_weight=0.0)


def test_grpo_ptx_adds_the_weighted_sft_loss_on_chat_only_and_resumes_its_stream(tiny_world) -> None:
    data, base = tiny_world
    model, tok, _ = load_model(base)
    tasks = read_tasks(data / "tasks_train.jsonl")
    conversations = read_conversations(data / "sft_train.jsonl")
    questions = {t["prompt"][-1]["content"] for t in tasks}
    assert any(m["content"] in questions for c in conversations for m in c["messages"])  # the data mixes both
    losses = {}
    for coef in (0.0, 2.0):
        cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=4, max_draws=1, ptx_coef=coef, ptx_batch=3)
        stage = grpo.GRPOStage(tok, model, copy.deepcopy(model), tasks, tasks[:2], cfg, seed=0)
        stage.add_ptx_data(conversations, 64)
        chats = grpo.chat_conversations(conversations, tasks)
        assert chats and not any(m["content"] in questions for c in chats for m in c["messages"])
        assert stage.ptx_stream.items == render_sft(tok, chats, 64)  # the stream holds the chat rows only
        batch = next(stage.batches("train"))
        assert ("ptx" in batch) == (coef > 0)
        batch["ptx"] = sft_batch(stage.ptx_stream.batch_items(0), tok.pad_id)  # the same rows for both
        losses[coef] = stage.loss(model, batch)
    (plain, _), (mixed, stats) = losses[0.0], losses[2.0]
    assert torch.isclose(mixed - plain, torch.tensor(2.0 * stats["ptx_loss"]), atol=1e-4)
    state = stage.state_dict()
    assert state["ptx_position"] == 1
    stage.load_state_dict({**state, "ptx_position": 9})
    assert stage.ptx_stream.position == 9


CURRICULUM_TASKS = [{"family": f, "id": f"{f}-{i}"} for f in ("solved", "hopeless", "learnable") for i in range(5)]


def test_starts_uniform_and_moves_draws_toward_families_with_mixed_outcomes() -> None:
    curriculum = FamilyCurriculum(CURRICULUM_TASKS, decay=0.5, floor=0.01)
    assert len(set(curriculum.weights())) == 1  # every family at p = 0.5
    for _ in range(10):
        curriculum.update(["solved"] * 4 + ["hopeless"] * 4 + ["learnable"] * 4, [1.0] * 4 + [0.0] * 4 + [1.0, 0.0] * 2)
    assert curriculum.success["solved"] > 0.99 and curriculum.success["hopeless"] < 0.01
    assert curriculum.success["learnable"] == 0.5
    drawn = Counter(t["family"] for t in curriculum.sample(random.Random(0), 2000))
    assert drawn["learnable"] > 0.8 * 2000  # weight 0.26 against ~0.01 + 0.01 each
    assert drawn["solved"] > 0 and drawn["hopeless"] > 0  # the floor keeps them in play


def test_state_round_trips_so_a_resumed_run_draws_the_same_tasks() -> None:
    curriculum = FamilyCurriculum(CURRICULUM_TASKS, decay=0.8, floor=0.02)
    curriculum.update(["solved", "hopeless", "learnable"], [1.0, 0.0, 1.0])
    resumed = FamilyCurriculum(CURRICULUM_TASKS, decay=0.8, floor=0.02)
    resumed.load_state_dict(curriculum.state_dict())
    assert curriculum.sample(random.Random(3), 50) == resumed.sample(random.Random(3), 50)


EVAL_TASKS = [{"id": str(i), "family": "add" if i < 4 else "sort", "answer": "1", "verifier": "math", "prompt": []}
         for i in range(8)]


def test_later_evaluations_report_tasks_won_lost_and_mcnemar_p_against_the_first(monkeypatch) -> None:
    evaluations = iter([[1, 0, 0, 0, 1, 0, 0, 0],  # step 0
                        [1, 1, 1, 1, 0, 1, 1, 0]])  # later: 5 won, 1 lost
    monkeypatch.setattr(grpo, "task_scores", lambda model, tok, tasks, max_new_tokens: [float(s) for s in next(evaluations)])
    cfg = GRPOConfig(eval_samples=0, curriculum=False)
    stage = grpo.GRPOStage(None, nn.Linear(1, 1), nn.Linear(1, 1), EVAL_TASKS, EVAL_TASKS, cfg, seed=0)
    first = stage.evaluate(nn.Linear(1, 1))
    assert first["pass_at_1"] == 0.25 and "pass_at_1_p" not in first
    # A resumed run keeps the step-0 scores, so its later evaluations are paired with the same baseline.
    resumed = grpo.GRPOStage(None, nn.Linear(1, 1), nn.Linear(1, 1), EVAL_TASKS, EVAL_TASKS, cfg, seed=0)
    resumed.load_state_dict(stage.state_dict())
    later = resumed.evaluate(nn.Linear(1, 1))
    assert later["pass_at_1"] == 0.75 and later["pass_at_1/add"] == 1.0 and later["pass_at_1/sort"] == 0.5
    assert (later["pass_at_1_won"], later["pass_at_1_lost"]) == (5.0, 1.0)
    assert later["pass_at_1_p"] == pytest.approx(2 * 7 / 64)  # 2 * P(X <= 1), X ~ Bin(6, 1/2)
