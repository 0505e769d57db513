"""Every training objective as a pure function of tensors: CE, Bradley–Terry, DPO, GAE, PPO-clip, GRPO, KL, distillation, MoE aux.

Masks are booleans, True = the position counts. Reductions are masked means over counted tokens unless a docstring
says otherwise (GRPO averages per reply first, as its paper does). Stages call these; none touches a model, so each
is checked against hand-computed values in tests/train/test_losses.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_mean(x: Tensor, mask: Tensor | None, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is True (all positions if mask is None); 0 where nothing counts."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def cross_entropy_loss(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token CE, -log softmax(logits)[target], over counted positions. logits (B, T, V), targets/mask (B, T).

    Computed in float32 whatever the logits dtype: a bf16 log-softmax over a large vocabulary loses the small
    probabilities that the loss is made of. Every counted token weighs the same (not every sequence).
    """
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return masked_mean(per_token, None if mask is None else mask.flatten())


def masked_lm_loss(model: nn.Module, ids: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """`cross_entropy_loss(model(ids), targets, mask)` with the vocabulary projection and its softmax computed at
    the counted positions only (`GPT.forward(logits_at=...)`). SFT rows and pretraining's task rows count the
    replies alone, and the projection is a quarter of a small model's compute: no need to pay it on prompts."""
    if mask is None:
        return cross_entropy_loss(model(ids), targets)
    mask = mask.bool()
    summed = F.cross_entropy(model(ids, logits_at=mask).float(), targets[mask], reduction="sum")
    return summed / mask.sum().clamp(min=1)  # 0 where nothing counts, as masked_mean


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Reward-model loss -log σ(r_c - r_r - m) (InstructGPT, Ouyang et al. 2022, arXiv:2203.02155 eq. 1). r_* (B,).

    The optional margin m (Llama 2 §3.2.2) asks for a gap of at least m. Diagnostics: pair accuracy, mean gap.
    """
    gap = r_chosen - r_rejected
    loss = -F.logsigmoid(gap - margin).mean()  # eq. 1
    gap = gap.detach()
    return loss, {"accuracy": float((gap > 0).float().mean()), "reward_gap": float(gap.mean())}


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290 eq. 7): -log σ(β[Δ(y_w) - Δ(y_l)]), Δ = log π_θ - log π_ref.

    Inputs are summed response log-probs, shape (B,). The implicit reward of a reply is β·Δ (eq. 5 up to a
    prompt-only term that cancels); accuracy is the share of pairs where the chosen reply's reward is higher.
    """
    reward_chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    reward_rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()  # eq. 7
    reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
    return loss, {
        "accuracy": float((reward_chosen > reward_rejected).float().mean()),
        "reward_chosen": float(reward_chosen.mean()),
        "reward_rejected": float(reward_rejected.mean()),
        "margin": float((reward_chosen - reward_rejected).mean()),
    }


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k1 = -log r = log π(x) - log π_ref(x), r = π_ref/π, x ~ π (Schulman 2020, "Approximating KL divergence").

    Unbiased for KL(π‖π_ref) but high-variance, and negative whenever π_ref(x) > π(x). Any shape.
    """
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 = (r - 1) - log r, r = π_ref(x)/π(x), x ~ π (Schulman 2020; GRPO arXiv:2402.03300 eq. 4).

    Unbiased for KL(π‖π_ref) (E_π[r] = 1) and never negative, since log r ≤ r - 1. Any shape.
    """
    log_ratio = ref_logp - logp
    # subtle: exp(x) - 1 - x cancels catastrophically for tiny x; expm1 keeps the result ≥ 0 in floating point too
    return torch.expm1(log_ratio) - log_ratio  # eq. 4


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv:1506.02438 eq. 16).

    δ_t = r_t + γ V(s_{t+1}) - V(s_t);  A_t = Σ_l (γλ)^l δ_{t+l}, computed backwards as A_t = δ_t + γλ A_{t+1}.
    rewards/values/mask (B, T), each row's counted positions one contiguous span (a reply). The episode ends at the
    row's last counted token: V after it is 0 (no bootstrapping from padding) and no advantage flows back from it.
    Returns (advantages, returns = advantages + values), both (B, T), zero outside the mask, without gradient
    (they are regression and policy-gradient targets).
    """
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(running)
    next_counted = torch.zeros_like(running)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value * next_counted - values[:, t]
        running = (delta + gamma * lam * running * next_counted) * mask_f[:, t]  # eq. 16
        advantages[:, t] = running
        next_value, next_counted = values[:, t], mask_f[:, t]
    return advantages, (advantages + values) * mask_f


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over counted positions, zero elsewhere; shift_mean=False keeps the mean (scale only).

    Uses the population variance (divide by the count); with few tokens this is a slightly larger scale than
    Bessel's correction would give, which only matters for tiny batches.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def ppo_clip_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip (Schulman et al. 2017, arXiv:1707.06347 eq. 7): -E_t[min(ρ_t A_t, clip(ρ_t, 1-ε, 1+ε) A_t)], ρ = π/π_old.

    All inputs (B, T) per token; the expectation is a mean over every counted token of the batch. Diagnostics:
    clip_frac (share of tokens with |ρ-1| > ε), approx_kl = mean of k3 = (ρ - 1) - log ρ, an estimate of
    KL(π_old‖π) on tokens sampled from π_old, ratio_mean and ratio_max (explosions show here first).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    loss = -masked_mean(torch.min(unclipped, clipped), mask)  # eq. 7
    with torch.no_grad():
        clip_frac = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)
        approx_kl = masked_mean(ratio - 1 - log_ratio, mask)
        ratio_max = float(ratio[mask].max()) if mask.any() else 1.0
        ratio_mean = masked_mean(ratio, mask)
    return loss, {"clip_frac": float(clip_frac), "approx_kl": float(approx_kl),
                  "ratio_mean": float(ratio_mean), "ratio_max": ratio_max}


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float) -> Tensor:
    """½·E_t[max((V - R)², (V_old + clip(V - V_old, -ε, ε) - R)²)]: PPO's clipped value loss. All (B, T).

    Not in the PPO paper: it comes from OpenAI baselines' ppo2 and is studied in Andrychowicz et al. 2021
    (arXiv:2006.05990); the max makes it pessimistic, like the policy clip.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_has_signal(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(N·G,) rewards grouped consecutively -> (N,) bool: False where all G rewards are equal (TRL #2703).

    Such a group has zero advantage everywhere, so it only dilutes the batch; the GRPO stage drops and counts it.
    """
    return rewards.view(-1, group_size).std(dim=1, unbiased=False) > eps


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> tuple[Tensor, Tensor]:
    """Group-relative advantages (Shao et al. 2024, arXiv:2402.03300 §4.1.2): Â_i = (r_i - mean(r)) / (std(r) + eps).

    rewards (N·G,) with each prompt's G replies consecutive. std is the population std (divide by G).
    scale=False keeps Â_i = r_i - mean(r) (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783 §3.1): dividing by the
    std weighs a group with one right reply in eight (std 0.33) three times as much as a half-right one.
    Returns (advantages (N·G,), has_signal (N,) from group_has_signal).
    """
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    advantages = (grouped - mean) / (std + eps) if scale else grouped - mean
    return advantages.flatten(), group_has_signal(rewards, group_size, eps)


def mean_per_reply(per_token: Tensor, mask: Tensor) -> Tensor:
    """GRPO's own average (arXiv:2402.03300 eq. 3), 1/G Σ_i 1/|o_i| Σ_t: a short reply's tokens weigh more than a
    long one's, so a right "The answer is 9." is pushed harder than a right "The answer is 9000.": replies drift
    shorter. Replies with no counted token are left out. per_token/mask (B, T)."""
    return masked_mean(masked_mean(per_token, mask, dim=1), mask.any(dim=1))  # eq. 3


def mean_per_token(per_token: Tensor, mask: Tensor) -> Tensor:
    """One mean over every counted token of the batch (DAPO, Yu et al. 2025, arXiv:2503.14476 §3.3)."""
    return masked_mean(per_token, mask)


def per_max_len(max_len: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Dr. GRPO (Liu et al. 2025, arXiv:2503.20783 §3.1): Σ_i Σ_t / (G · max_len), G the replies with a counted
    token, max_len the longest reply the rollout allows: every token weighs the same whatever the lengths."""
    if max_len < 1:
        raise ValueError(f"per_max_len needs max_len >= 1 (the longest reply the rollout allows), got {max_len}")

    def reduce(per_token: Tensor, mask: Tensor) -> Tensor:
        return (per_token * mask).sum() / (mask.any(dim=1).sum().clamp(min=1) * max_len)

    return reduce


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    kl_coef: float,
    average: Callable[[Tensor, Tensor], Tensor] = mean_per_reply,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO objective (arXiv:2402.03300 eq. 3) with the k3 KL to the reference (eq. 4), negated for descent.

    J = 1/G Σ_i 1/|o_i| Σ_t [min(ρ_t Â_i, clip(ρ_t, 1-ε, 1+ε) Â_i) - β·KL_k3], ρ_t = π/π_old per token.
    `average` turns the per-token terms into one number: `mean_per_reply` (the paper's, above), `mean_per_token`
    (DAPO) or `per_max_len(n)` (Dr. GRPO); each is a function here, not a string option (STYLE.md, after TRL).
    logprobs/old/ref/mask (B, T); advantages (B,), one per reply. ref_logprobs None: no KL term (β = 0, as
    DAPO and Dr. GRPO; the caller then needs no reference forward pass) and no "kl" in the stats.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    kl = None if ref_logprobs is None else kl_k3(logprobs, ref_logprobs)  # eq. 4
    loss = -average(surrogate if kl is None else surrogate - kl_coef * kl, mask)
    with torch.no_grad():
        stats = {"clip_frac": float(masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)),
                 "ratio_mean": float(masked_mean(ratio, mask))}
        if kl is not None:
            stats["kl"] = float(masked_mean(kl, mask))
    return loss, stats


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, mask: Tensor | None, alpha: float, temperature: float
) -> tuple[Tensor, dict[str, float]]:
    """Knowledge distillation (Hinton et al. 2015, arXiv:1503.02531 §2): α·CE(y, s) + (1-α)·T²·KL(p_t^T ‖ p_s^T).

    p^T = softmax(logits / T) over the full vocabulary; the KL is summed over the vocabulary and averaged over
    counted tokens. The T² factor (§2, last paragraph) keeps the soft term's gradient scale independent of T.
    student_logits/teacher_logits (B, T, V); targets/mask (B, T).
    """
    ce = cross_entropy_loss(student_logits, targets, mask)
    t = temperature
    teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    kl_per_token = (teacher.exp() * (teacher - student)).sum(-1)  # (B, T)
    kl = masked_mean(kl_per_token, mask)
    loss = alpha * ce + (1 - alpha) * t * t * kl
    return loss, {"ce": float(ce.detach()), "kl_teacher": float(kl.detach())}
