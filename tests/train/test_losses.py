"""Every loss against numbers worked out by hand on 1-2 element tensors."""

from __future__ import annotations

import math

import torch

from scratchllm.train.losses import (
    bradley_terry_loss,
    cross_entropy_loss,
    distillation_loss,
    dpo_loss,
    gae,
    grpo_advantages,
    grpo_loss,
    kl_k1,
    kl_k3,
    load_balancing_loss,
    ppo_clip_loss,
    value_loss,
    whiten,
)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_cross_entropy_respects_mask() -> None:
    logits = torch.tensor([[[0.0, 0.0], [10.0, -10.0]]])
    targets = torch.tensor([[0, 1]])
    assert math.isclose(float(cross_entropy_loss(logits, targets, torch.tensor([[True, False]]))), math.log(2), rel_tol=1e-6)


def test_bradley_terry_known_answer() -> None:
    # r_c - r_r = [1, -1]: loss = mean(-log σ(1), -log σ(-1)); accuracy 1/2
    loss, stats = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    expected = (-math.log(sigmoid(1)) - math.log(sigmoid(-1))) / 2
    assert math.isclose(float(loss), expected, rel_tol=1e-6) and stats["accuracy"] == 0.5
    loss_m, _ = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=1.0)
    assert math.isclose(float(loss_m), math.log(2), rel_tol=1e-6)  # gap - margin = 0


def test_dpo_two_example_hand_computed() -> None:
    # β=0.5. Example 1: Δw = -1 - (-2) = 1, Δl = -3 - (-2) = -1 -> logit 0.5·2 = 1.
    # Example 2: Δw = -2 - (-1) = -1, Δl = -1 - (-1) = 0 -> logit 0.5·(-1) = -0.5.
    loss, stats = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]),
                           torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -1.0]), beta=0.5)
    expected = (-math.log(sigmoid(1.0)) - math.log(sigmoid(-0.5))) / 2
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert stats["accuracy"] == 0.5
    # policy == reference: loss is log 2 whatever the log-probs
    same = torch.tensor([-4.0])
    assert math.isclose(float(dpo_loss(same, same - 1, same, same - 1, 0.1)[0]), math.log(2), rel_tol=1e-6)


def test_kl_estimators() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-2.0, -1.0, -0.5])
    assert torch.allclose(kl_k1(logp, ref), torch.tensor([1.0, -1.0, 0.0]))  # k1 can be negative
    k3 = kl_k3(logp, ref)
    assert (k3 >= 0).all() and k3[2] == 0  # k3 = e^{-1}-1+1, e^{1}-1-1, 0
    assert torch.allclose(k3, torch.tensor([math.exp(-1), math.e - 2, 0.0]))
    assert (kl_k3(torch.randn(1000), torch.randn(1000)) >= 0).all()


def test_gae_hand_computed_with_ragged_mask() -> None:
    # Row 0: 3 steps, rewards [0, 0, 1], values [0.5, 0.5, 0.5], γ=1, λ=0.5.
    # δ2 = 1 - 0.5 = 0.5; δ1 = 0 + 0.5 - 0.5 = 0; δ0 = 0.
    # A2 = 0.5; A1 = 0 + 0.5·0.5 = 0.25; A0 = 0 + 0.5·0.25 = 0.125.
    # Row 1 ends after 1 step: A0 = r0 - V0 = 2 - 1 = 1, nothing bootstrapped from the padding.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5], [1.0, 0.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 0.75, 1.0], [2.0, 0.0, 0.0]]))


def test_whiten() -> None:
    x = torch.tensor([1.0, 3.0, 100.0])
    out = whiten(x, torch.tensor([True, True, False]))
    assert torch.allclose(out, torch.tensor([-1.0, 1.0, 0.0]), atol=1e-4)


def test_ppo_clip_inside_and_outside_range() -> None:
    # ratio e^{0.1}≈1.105 (inside ε=0.2) and e^{0.5}≈1.649 (outside), both with A=1:
    # min(ρA, clip(ρ)A) = [1.105, 1.2]; loss = -mean = -(1.105 + 1.2)/2. Clip fraction 1/2.
    logp = torch.tensor([[0.1, 0.5]])
    old = torch.zeros(1, 2)
    loss, stats = ppo_clip_loss(logp, old, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), clip_eps=0.2)
    assert math.isclose(float(loss), -(math.exp(0.1) + 1.2) / 2, rel_tol=1e-6)
    assert stats["clip_frac"] == 0.5
    # negative advantage: the pessimistic bound takes the unclipped larger ratio
    loss_neg, _ = ppo_clip_loss(logp, old, -torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), clip_eps=0.2)
    assert math.isclose(float(loss_neg), (math.exp(0.1) + math.exp(0.5)) / 2, rel_tol=1e-6)


def test_value_loss_clipped() -> None:
    # V=2, V_old=0, R=2, ε=0.5: unclipped error 0, clipped V=0.5 -> error 2.25; ½·max = 1.125
    loss = value_loss(torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.tensor([[True]]), 0.5)
    assert math.isclose(float(loss), 1.125)


def test_grpo_advantages_and_dropped_groups() -> None:
    adv, signal = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    assert signal.tolist() == [True, False]
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-3)
    assert torch.all(adv[4:] == 0)


def test_grpo_loss_reduces_to_pg_at_ratio_one() -> None:
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]), mask, 0.2, kl_coef=0.1)
    assert math.isclose(float(loss), 0.0, abs_tol=1e-7) and stats["kl"] == 0.0  # (1 + -1)/2, no KL
    loss.backward()
    # ∂/∂logp of -mean_i(mean_t ρ A_i): row 0 tokens -1/2·1/2 each, row 1 token +1/2·1
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25], [0.5, 0.0]]))


def test_distillation_equals_ce_when_alpha_one_and_kl_zero_for_same_logits() -> None:
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    loss, stats = distillation_loss(logits, logits.clone(), targets, None, alpha=1.0, temperature=2.0)
    assert math.isclose(float(loss), float(cross_entropy_loss(logits, targets)), rel_tol=1e-6)
    assert abs(stats["kl_teacher"]) < 1e-6


def test_load_balancing_minimal_for_uniform_router() -> None:
    n, e = 8, 4
    uniform = load_balancing_loss(torch.full((n, e), 1 / e), torch.arange(n)[:, None] % e, e)
    skewed = load_balancing_loss(torch.tensor([[0.7, 0.1, 0.1, 0.1]] * n), torch.zeros(n, 1, dtype=torch.long), e)
    assert math.isclose(float(uniform), 1.0, rel_tol=1e-6) and float(skewed) > 2.0
