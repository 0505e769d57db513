"""Every loss against numbers worked out by hand on 1-2 element tensors, plus the invariants each one promises."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchllm.train.losses import (
    bradley_terry_loss,
    cross_entropy_loss,
    distillation_loss,
    dpo_loss,
    gae,
    group_has_signal,
    grpo_advantages,
    grpo_loss,
    kl_k1,
    kl_k3,
    masked_lm_loss,
    mean_per_reply,
    mean_per_token,
    per_max_len,
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


def test_masked_lm_loss_is_cross_entropy_of_the_full_logits() -> None:
    # The projection runs at the counted positions only; the loss and its gradient are the full forward's.
    from scratchllm.config import model_preset
    from scratchllm.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=40))
    ids, targets = torch.randint(0, 40, (2, 2, 12))
    for mask in (torch.rand(2, 12) < 0.3, torch.zeros(2, 12, dtype=torch.bool), None):
        fast = masked_lm_loss(model, ids, targets, mask)
        full = cross_entropy_loss(model(ids), targets, mask)
        assert torch.allclose(fast, full, atol=1e-6)
        if mask is not None and mask.any():
            for a, b in zip(torch.autograd.grad(fast, model.parameters()), torch.autograd.grad(full, model.parameters())):
                assert torch.allclose(a, b, atol=1e-6)


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
    assert math.isclose(float(loss.detach()), 0.0, abs_tol=1e-7) and stats["kl"] == 0.0  # (1 + -1)/2, no KL
    loss.backward()
    # ∂/∂logp of -mean_i(mean_t ρ A_i): row 0 tokens -1/2·1/2 each, row 1 token +1/2·1
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25], [0.5, 0.0]]))


def test_grpo_loss_without_reference_is_the_zero_beta_objective() -> None:
    # ref_logprobs None (β = 0, no reference forward): the loss and gradient of kl_coef = 0 with any reference.
    logp = torch.tensor([[-1.0, -0.5], [-2.0, -1.5]], requires_grad=True)
    old, ref = torch.tensor([[-1.1, -0.4], [-2.0, -1.0]]), torch.tensor([[-3.0, -0.1], [-0.5, -1.5]])
    mask, adv = torch.tensor([[True, True], [True, False]]), torch.tensor([1.0, -1.0])
    without, stats = grpo_loss(logp, old, None, adv, mask, 0.2, kl_coef=0.5)
    zero_beta, _ = grpo_loss(logp, old, ref, adv, mask, 0.2, kl_coef=0.0)
    with_kl, _ = grpo_loss(logp, old, ref, adv, mask, 0.2, kl_coef=0.5)
    assert "kl" not in stats and torch.allclose(without, zero_beta) and not torch.allclose(without, with_kl)
    assert torch.allclose(torch.autograd.grad(without, logp)[0], torch.autograd.grad(zero_beta, logp)[0])


def test_grpo_loss_normalisations_weigh_tokens_as_documented() -> None:
    # Reply 0: 4 tokens, Â = +1 (a long right reply); reply 1: 1 token, Â = +1 (a short right one). At ρ = 1,
    # no KL, the gradient on each token is minus its weight in the average.
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    adv = torch.tensor([1.0, 1.0])
    expected = [
        (mean_per_reply, [[1 / 8] * 4, [1 / 2, 0, 0, 0]]),  # 1/G · 1/|o_i|: the short reply's token weighs 4x
        (mean_per_token, [[1 / 5] * 4, [1 / 5, 0, 0, 0]]),  # one mean over the 5 counted tokens
        (per_max_len(6), [[1 / 12] * 4, [1 / 12, 0, 0, 0]]),  # 1/(G · max_len), max_len = 6
    ]
    for average, weights in expected:
        logp.grad = None
        loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, 0.2, 0.0, average)
        loss.backward()
        assert torch.allclose(-logp.grad, torch.tensor(weights)), average
    with pytest.raises(ValueError, match="max_len"):
        per_max_len(0)


def test_grpo_advantages_without_std_scaling() -> None:
    # Dr. GRPO: r - mean(r). One right reply in four: [0.75, -0.25, -0.25, -0.25]; scaled it would be 3x that
    adv, signal = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, scale=False)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25])) and signal.tolist() == [True]
    scaled, _ = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4)
    assert torch.allclose(scaled, adv / math.sqrt(3 / 16), atol=1e-3)


def test_distillation_equals_ce_when_alpha_one_and_kl_zero_for_same_logits() -> None:
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    loss, stats = distillation_loss(logits, logits.clone(), targets, None, alpha=1.0, temperature=2.0)
    assert math.isclose(float(loss), float(cross_entropy_loss(logits, targets)), rel_tol=1e-6)
    assert abs(stats["kl_teacher"]) < 1e-6


def test_cross_entropy_upcasts_and_unmasked_mean() -> None:
    # logits [0, ln 3] -> p = [1/4, 3/4]; CE(target 1) = -log 3/4, CE(target 0) = log 4; mean = (log 4 - log 0.75)/2
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    targets = torch.tensor([[1, 0]])
    expected = (math.log(4) - math.log(0.75)) / 2
    assert math.isclose(float(cross_entropy_loss(logits, targets)), expected, rel_tol=1e-6)
    bf16 = cross_entropy_loss(logits.bfloat16(), targets)
    assert bf16.dtype == torch.float32 and math.isclose(float(bf16), expected, rel_tol=1e-2)


def test_bradley_terry_gap_and_gradient_direction() -> None:
    r_c = torch.tensor([0.5, 3.0], requires_grad=True)
    loss, stats = bradley_terry_loss(r_c, torch.tensor([1.0, 1.0]))
    assert stats["accuracy"] == 0.5 and math.isclose(stats["reward_gap"], (-0.5 + 2.0) / 2)
    loss.backward()
    # d/dr_c of -log σ(g)/B = -(1 - σ(g))/2 < 0: raising the chosen reward lowers the loss
    assert torch.allclose(r_c.grad, torch.tensor([-(1 - sigmoid(-0.5)) / 2, -(1 - sigmoid(2.0)) / 2]))


def test_dpo_diagnostics_hand_computed() -> None:
    # β=0.5: rewards chosen = 0.5·[1, -1] = [0.5, -0.5], rejected = 0.5·[-1, 0] = [-0.5, 0]
    _, stats = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]),
                        torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -1.0]), beta=0.5)
    assert math.isclose(stats["reward_chosen"], 0.0, abs_tol=1e-7)  # (0.5 - 0.5)/2
    assert math.isclose(stats["reward_rejected"], -0.25)  # (-0.5 + 0)/2
    assert math.isclose(stats["margin"], 0.25)  # mean([1.0, -0.5])


def test_kl_estimators_are_unbiased_in_exact_expectation() -> None:
    # π = [0.8, 0.2], π_ref = [0.4, 0.6]: KL(π‖π_ref) = 0.8 ln 2 + 0.2 ln(1/3).
    # Σ_x π(x)·k(x) must equal it exactly for k1 and k3 (E_π[r] = Σ π_ref = 1 makes the k3 extra term vanish).
    logp, ref = torch.tensor([0.8, 0.2]).log(), torch.tensor([0.4, 0.6]).log()
    kl = 0.8 * math.log(2) + 0.2 * math.log(1 / 3)
    p = logp.exp()
    assert math.isclose(float((p * kl_k1(logp, ref)).sum()), kl, rel_tol=1e-5)
    assert math.isclose(float((p * kl_k3(logp, ref)).sum()), kl, rel_tol=1e-5)
    assert float(kl_k1(logp, ref).min()) < 0  # k1 at x=1 is ln(0.2/0.6) < 0


@settings(max_examples=200, deadline=None)
@given(st.floats(-30, 0), st.floats(-30, 0))
def test_k3_never_negative(logp: float, ref: float) -> None:
    assert float(kl_k3(torch.tensor([logp]), torch.tensor([ref]))) >= 0.0


def test_gae_discounted_reply_after_prompt() -> None:
    # Row: prompt position (masked) then a 2-token reply; γ=0.5, λ=0.5, rewards [_, 0, 1], values [_, 1, 2].
    # δ2 = 1 + 0 - 2 = -1 (last token: no bootstrap); δ1 = 0 + 0.5·2 - 1 = 0.
    # A2 = -1; A1 = δ1 + γλ·A2 = 0 + 0.25·(-1) = -0.25. Returns = A + V = [0, 0.75, 1].
    rewards = torch.tensor([[5.0, 0.0, 1.0]])
    values = torch.tensor([[9.0, 1.0, 2.0]], requires_grad=True)
    mask = torch.tensor([[False, True, True]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.0, -0.25, -1.0]]))
    assert torch.allclose(ret, torch.tensor([[0.0, 0.75, 1.0]]))
    assert not adv.requires_grad  # targets, not part of the graph


def test_gae_lambda_one_is_reward_to_go_minus_value() -> None:
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [False, True, True, True, False]])
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv, (reward_to_go - values) * mask, atol=1e-6)


def test_whiten_keeps_mean_when_asked() -> None:
    # counted [1, 3]: mean 2, std 1 -> [-1, 1]; shift_mean=False adds the mean back -> [1, 3]
    out = whiten(torch.tensor([1.0, 3.0, 50.0]), torch.tensor([True, True, False]), shift_mean=False)
    assert torch.allclose(out, torch.tensor([1.0, 3.0, 0.0]), atol=1e-4)


def test_ppo_diagnostics_hand_computed() -> None:
    # log ρ = [0, ln 2] -> ρ = [1, 2]; k3 = ρ - 1 - log ρ = [0, 1 - ln 2]; masked third token ignored.
    logp = torch.tensor([[0.0, math.log(2), 5.0]])
    mask = torch.tensor([[True, True, False]])
    _, stats = ppo_clip_loss(logp, torch.zeros(1, 3), torch.ones(1, 3), mask, clip_eps=0.2)
    assert math.isclose(stats["approx_kl"], (1 - math.log(2)) / 2, rel_tol=1e-6)
    assert math.isclose(stats["ratio_mean"], 1.5, rel_tol=1e-6) and math.isclose(stats["ratio_max"], 2.0, rel_tol=1e-6)


def test_value_loss_takes_unclipped_when_larger() -> None:
    # V=-1, V_old=0, R=3, ε=0.5: unclipped (-1-3)² = 16 > clipped (-0.5-3)² = 12.25 -> ½·16; masked token ignored.
    loss = value_loss(torch.tensor([[-1.0, 3.0]]), torch.zeros(1, 2), torch.tensor([[3.0, 3.0]]),
                      torch.tensor([[True, False]]), 0.5)
    assert math.isclose(float(loss), 8.0)  # ½·16


def test_grpo_advantages_two_element_groups() -> None:
    # group [3, 1]: mean 2, population std 1 -> [1, -1]/(1 + 1e-4); group [2, 2]: std 0 -> [0, 0], no signal
    adv, signal = grpo_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), group_size=2)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]) / (1 + 1e-4))
    assert signal.tolist() == [True, False]
    assert group_has_signal(torch.tensor([0.0, 0.0, 0.0, 1.0]), 2).tolist() == [False, True]


def test_grpo_loss_clip_and_kl_hand_computed() -> None:
    # One reply, two tokens, Â = 1, ε = 0.2, β = 0.5.
    # token 0: ρ = e^{0.5} clipped to 1.2; ref = logp -> k3 = 0.       per-token 1.2
    # token 1: ρ = 1; ref - logp = ln 2 -> k3 = (2 - 1) - ln 2.      per-token 1 - 0.5·(1 - ln 2)
    # loss = -mean(1.2, 1 - 0.5(1 - ln 2)); a second reply with no counted token is left out of the mean.
    logp = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    old = torch.tensor([[0.0, -1.0], [0.0, 0.0]])
    ref = torch.tensor([[0.5, -1.0 + math.log(2)], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [False, False]])
    loss, stats = grpo_loss(logp, old, ref, torch.tensor([1.0, 7.0]), mask, clip_eps=0.2, kl_coef=0.5)
    expected = -(1.2 + 1 - 0.5 * (1 - math.log(2))) / 2
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert stats["clip_frac"] == 0.5 and math.isclose(stats["kl"], (1 - math.log(2)) / 2, rel_tol=1e-6)


def test_distillation_hand_computed_two_token_vocab() -> None:
    # T = 2, α = 0.5. student logits [0, 0] -> p_s = [½, ½] at any T; CE(target 0) = ln 2.
    # teacher logits [0, 2 ln 3] / T = [0, ln 3] -> p_t = [¼, ¾].
    # KL(p_t‖p_s) = ¼ ln(½) + ¾ ln(3/2) ; loss = ½ ln 2 + ½·4·KL.
    student = torch.zeros(1, 1, 2)
    teacher = torch.tensor([[[0.0, 2 * math.log(3)]]])
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    loss, stats = distillation_loss(student, teacher, torch.tensor([[0]]), None, alpha=0.5, temperature=2.0)
    assert math.isclose(stats["kl_teacher"], kl, rel_tol=1e-5)
    assert math.isclose(float(loss), 0.5 * math.log(2) + 2 * kl, rel_tol=1e-5)


def test_distill_loss_hand_computed_with_mask() -> None:
    # V = 2, T = 1, α = 0.25; two positions, the second masked out (its huge logits must not count).
    # position 0: student [ln 3, 0] -> p_s = [¾, ¼]; teacher [0, 0] -> p_t = [½, ½]; target 1 -> CE = ln 4.
    # KL(p_t‖p_s) = ½ ln(½/¾) + ½ ln(½/¼) = ½ ln(4/3).
    student = torch.tensor([[[math.log(3), 0.0], [50.0, -50.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [-50.0, 50.0]]])
    mask = torch.tensor([[True, False]])
    loss, stats = distillation_loss(student, teacher, torch.tensor([[1, 0]]), mask, alpha=0.25, temperature=1.0)
    kl = 0.5 * math.log(4 / 3)
    assert math.isclose(stats["ce"], math.log(4), rel_tol=1e-6)
    assert math.isclose(stats["kl_teacher"], kl, rel_tol=1e-6)
    assert math.isclose(float(loss), 0.25 * math.log(4) + 0.75 * kl, rel_tol=1e-6)


def test_distill_loss_is_zero_when_student_equals_teacher_and_alpha_zero() -> None:
    logits = torch.randn(2, 4, 7) * 3
    loss, stats = distillation_loss(logits, logits.clone(), torch.randint(0, 7, (2, 4)), None, alpha=0.0, temperature=3.0)
    assert abs(float(loss)) < 1e-6 and abs(stats["kl_teacher"]) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_distill_loss_gradient_is_t_times_soft_target_gap(temperature: float) -> None:
    # Hinton et al. 2015 eq. 2: ∂KL_T/∂z = (q - p)/T; the T² factor makes it T·(q - p), averaged over tokens.
    student = torch.randn(3, 6, requires_grad=True)
    teacher = torch.randn(3, 6)
    loss, _ = distillation_loss(student[None], teacher[None], torch.zeros(1, 3, dtype=torch.long), None, 0.0, temperature)
    loss.backward()
    q, p = torch.softmax(student.detach() / temperature, -1), torch.softmax(teacher / temperature, -1)
    assert torch.allclose(student.grad, temperature * (q - p) / 3, atol=1e-6)


def test_t_squared_keeps_the_soft_gradient_scale_independent_of_temperature() -> None:
    # High-T limit (§2.1): T·(q - p) -> (z - v)/V for zero-mean logits, whatever T is; without T² it would shrink as 1/T².
    student = torch.randn(1, 1, 8)
    student = (student - student.mean()).requires_grad_(True)
    teacher = torch.randn(1, 1, 8)
    teacher = teacher - teacher.mean()
    grads = []
    for temperature in (20.0, 40.0):
        student.grad = None
        distillation_loss(student, teacher, torch.zeros(1, 1, dtype=torch.long), None, 0.0, temperature)[0].backward()
        grads.append(student.grad.clone())
    limit = (student.detach() - teacher) / 8
    for grad in grads:
        assert torch.allclose(grad, limit, atol=0.05 * limit.abs().max())
