"""DPO raises its implicit-reward accuracy; the RPO term and the held-out means, checked by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from scratchllm.config import DPOConfig, LoopConfig
from scratchllm.data.chat_batches import pair_batch, render_pair
from scratchllm.data.jsonl import read_preferences
from scratchllm.model.io import load_model
from scratchllm.model.logprobs import sequence_logprobs
from scratchllm.train.losses import dpo_loss
from scratchllm.train.stages import dpo
from tests.conftest import FAST
from tests.train.stages.conftest import first_and_last_eval


def test_dpo_raises_implicit_reward_accuracy(sft_model, tmp_path) -> None:
    root, data = sft_model
    dpo.run(tmp_path, root / "sft" / "final", data, FAST + ["--loop.max_steps=25", "--loop.batch_size=16", "--optim.lr=1e-3"])
    before, after = first_and_last_eval(tmp_path / "dpo")
    assert after["dpo_margin"] > before["dpo_margin"] + 0.1
    assert after["dpo_accuracy"] > 0.6


def test_dpo_sft_weight_adds_the_per_token_nll_of_the_chosen_reply(tiny_world) -> None:
    data, base = tiny_world
    model, tok, _ = load_model(base)
    pairs = read_preferences(data / "prefs_train.jsonl")[:4]
    losses = {}
    for weight in (0.0, 0.5):
        stage = dpo.DPOStage(tok, copy.deepcopy(model), pairs, [], [], [], DPOConfig(sft_weight=weight),
                             LoopConfig(batch_size=4))
        batch = next(stage.batches("train"))
        losses[weight] = stage.loss(model, batch)[0]
    logps = sequence_logprobs(model, batch["chosen"], batch["chosen_mask"])
    nll_per_token = (-logps / batch["chosen_mask"][:, 1:].sum(1)).mean()  # the scored tokens: targets ids[1:]
    assert torch.isclose(losses[0.5] - losses[0.0], 0.5 * nll_per_token, atol=1e-5)


def test_dpo_held_out_metrics_are_means_over_pairs_with_the_reference_scored_once(tiny_world) -> None:
    """Evaluation batches the held-out pairs by length and caches the frozen reference's log-probs; its numbers
    must still be plain means over pairs, for this policy, against the reference, at every evaluation."""
    data, base = tiny_world
    model, tok, _ = load_model(base)
    pairs = read_preferences(data / "prefs_val.jsonl")[:70]  # one full batch of 64 and a short one
    reference = copy.deepcopy(model)
    stage = dpo.DPOStage(tok, reference, pairs[:4], pairs, [], [], DPOConfig(), LoopConfig(batch_size=4))
    calls = []
    hook = reference.register_forward_hook(lambda *_: calls.append(1))

    def direct(policy) -> dict[str, float]:
        whole = pair_batch([render_pair(tok, p, 256) for p in pairs], tok.pad_id)
        logps = {side: (sequence_logprobs(policy, whole[side], whole[f"{side}_mask"]),
                        sequence_logprobs(reference, whole[side], whole[f"{side}_mask"])) for side in ("chosen", "rejected")}
        _, stats = dpo_loss(logps["chosen"][0], logps["rejected"][0], logps["chosen"][1], logps["rejected"][1],
                             DPOConfig().beta)
        return stats

    with torch.no_grad():
        for policy_seed in (0, 1):  # the second evaluation reuses the reference's cached log-probs
            torch.manual_seed(policy_seed)
            for param in model.parameters():
                param.add_(0.02 * torch.randn_like(param))
            got = {k: v for k, v in stage.evaluate(model).items() if k.startswith("dpo_")}
            n_calls = len(calls)
            want = direct(model)
            assert got["dpo_accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
            assert got["dpo_margin"] == pytest.approx(want["margin"], rel=1e-4, abs=1e-5)
            assert got["dpo_reward_chosen"] == pytest.approx(want["reward_chosen"], rel=1e-4, abs=1e-5)
            calls.clear()
    hook.remove()
    assert n_calls == 0  # the second evaluation never ran the reference
