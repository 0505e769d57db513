"""Held-out reply scoring (PPO's evaluation and the comparison table): chunked scoring equals one batch, sampled
draws are paired by seed and equal the greedy scores at temperature 0, judge agreement counts the right pairs."""

from __future__ import annotations

import copy

import pytest
import torch

from scratchllm.data.jsonl import read_preferences
from scratchllm.eval.chat_eval import generate_replies
from scratchllm.eval.reply_scores import (
    judge_agreement,
    render_replies,
    reward_scores,
    sampled_reply_scores,
    score_replies,
)
from scratchllm.model.heads import ScalarModel
from scratchllm.model.io import load_model
from scratchllm.model.logprobs import response_token_kl


def test_sampled_reply_scores_pair_the_draws_and_equal_the_greedy_scores_at_temperature_0(sft_model) -> None:
    root, data = sft_model
    policy, tok, _ = load_model(root / "sft" / "final")
    torch.manual_seed(0)
    reward_model = ScalarModel(copy.deepcopy(policy)).eval()  # an untrained head: any fixed scorer will do
    pairs = read_preferences(data / "prefs_val.jsonl")[:6]
    device = torch.device("cpu")
    greedy = score_replies(policy, policy, reward_model, tok, pairs,
                               generate_replies(policy, tok, [p["prompt"] for p in pairs], 12), device)
    at_zero, gold = sampled_reply_scores(policy, reward_model, tok, pairs, 3, 0.0, 12, device)
    assert len(gold) == 3 * len(pairs) and gold[: len(pairs)] == gold[len(pairs) : 2 * len(pairs)]
    assert at_zero["gold_score_sampled"] == pytest.approx(greedy["gold_score"])
    assert at_zero["learned_reward_sampled"] == pytest.approx(greedy["learned_reward"], abs=1e-4)
    assert at_zero["judge_pairs_sampled"] == 0 and "rm_judge_agreement_sampled" not in at_zero  # identical replies
    first = sampled_reply_scores(policy, reward_model, tok, pairs, 3, 1.0, 12, device, seed=5)
    again = sampled_reply_scores(policy, reward_model, tok, pairs, 3, 1.0, 12, device, seed=5)
    assert first == again  # the same seed draws the same replies: every checkpoint is scored on paired draws


def test_judge_agreement_counts_pairs_the_judge_tells_apart_by_prompt() -> None:
    # Two prompts, three replies each (reply k of prompt i at 2k + i).
    learned = [1.0, 5.0, 2.0, 3.0, 2.0, 0.0]
    gold = [0.5, 1.0, 1.0, 1.0, 0.75, 0.5]
    # Prompt 0: (0, 2) and (0, 4) agree, (2, 4) is a learned-reward tie (disagrees). Prompt 1: (1, 3) the judge
    # cannot tell apart (not counted), (1, 5) and (3, 5) agree. Replies to different prompts are never compared.
    assert judge_agreement(learned, gold, 2) == (4, 5)
    assert judge_agreement([-x for x in learned], gold, 2) == (0, 5)


def test_reply_scoring_in_length_sorted_chunks_equals_one_batch(tiny_world) -> None:
    """Scores come back in row order and match the whole padded batch at once, whatever the chunk size."""
    data, base = tiny_world
    model, tok, _ = load_model(base)
    torch.manual_seed(0)
    rm, reference = ScalarModel(copy.deepcopy(model)), copy.deepcopy(model)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.02 * torch.randn_like(param))  # a reference unlike the policy: KL is not 0
    pairs = read_preferences(data / "prefs_val.jsonl")[:13]
    replies = [(p["chosen"] if i % 2 else p["rejected"][: 3 + i], i % 3 != 0) for i, p in enumerate(pairs)]
    ids, mask, lengths = render_replies(tok, pairs, replies)
    cpu = torch.device("cpu")
    with torch.no_grad():
        whole = rm(ids, lengths)
        kl, m = response_token_kl(model, reference, ids, mask)
    assert lengths.unique().numel() > 3  # rows of many lengths: chunks are cut to different widths
    for chunk in (1, 4, 64):
        assert torch.allclose(reward_scores(rm, ids, lengths, cpu, chunk), whole, atol=1e-5)
        scored = score_replies(model, reference, rm, tok, pairs, replies, cpu, chunk)
        assert scored["kl_to_sft"] == pytest.approx(float((kl * m).sum() / m.sum()), rel=1e-4)
        assert scored["learned_reward"] == pytest.approx(float(whole.mean()), abs=1e-5)
