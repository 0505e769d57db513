"""Every training objective as a pure function of tensors: CE, Bradley–Terry, DPO, GAE, PPO-clip, GRPO, KL, distillation.

Masks are booleans, True = the position counts. Stages call these; none of them touches a model, so each
is checked against hand-computed values in tests/train/test_losses.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor | None, dim: int | None = None) -> Tensor:
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def cross_entropy_loss(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token CE over counted positions. logits (B, T, V), targets (B, T), mask (B, T)."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return masked_mean(per_token, None if mask is None else mask.flatten())


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """-log σ(r_c - r_r - m) (InstructGPT, Ouyang et al. 2022, arXiv:2203.02155 eq. 1). r_* (B,)."""
    gap = r_chosen - r_rejected
    loss = -F.logsigmoid(gap - margin).mean()  # eq. 1
    gap = gap.detach()
    return loss, {"accuracy": float((gap > 0).float().mean()), "reward_gap": float(gap.mean())}


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290 eq. 7): -log σ(β[Δ(y_w) - Δ(y_l)]), Δ = log π_θ - log π_ref.

    Inputs are summed response log-probs, shape (B,). The implicit reward of a reply is β·Δ.
    """
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(reward_chosen - reward_rejected).mean()  # eq. 7
    reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
    return loss, {
        "accuracy": float((reward_chosen > reward_rejected).float().mean()),
        "reward_chosen": float(reward_chosen.mean()),
        "reward_rejected": float(reward_rejected.mean()),
        "margin": float((reward_chosen - reward_rejected).mean()),
    }


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 = log π(x) - log π_ref(x) for x ~ π: unbiased for KL(π‖π_ref), can be negative (Schulman 2020)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 = r - 1 - log r with r = π_ref/π: unbiased and always >= 0 (Schulman 2020; GRPO eq. 4)."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio  # expm1: exp(x)-1 rounds below x for tiny x; this never does


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv:1506.02438 eq. 16).

    δ_t = r_t + γ V(s_{t+1}) - V(s_t);  A_t = Σ_l (γλ)^l δ_{t+l}. rewards/values/mask (B, T); positions
    after a row's last counted token are neither bootstrapped from nor given advantage.
    Returns (advantages, returns = advantages + values), zero outside the mask.
    """
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * (mask_f[:, t + 1] if t + 1 < T else 0.0)  # eq. 16
        running = running * mask_f[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask_f


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over counted positions; with shift_mean=False the mean is restored (TRL's reward whitening)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def ppo_clip_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip (Schulman et al. 2017, arXiv:1707.06347 eq. 7): -E[min(ρA, clip(ρ, 1-ε, 1+ε)A)], ρ = π/π_old.

    All inputs (B, T) per token. approx_kl is the k3 estimate of KL(π_old‖π) on the sampled tokens.
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
    return loss, {"clip_frac": float(clip_frac), "approx_kl": float(approx_kl), "ratio_max": ratio_max}


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float) -> Tensor:
    """½·max((V - R)², (clip(V, V_old ± ε) - R)²): the clipped value loss of PPO implementations (Andrychowicz et al. 2021)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Group-relative advantages (Shao et al. 2024, arXiv:2402.03300 §4.1.2): Â_i = (r_i - mean(r)) / std(r).

    rewards (N·G,) grouped consecutively. Returns (advantages (N·G,), has_signal (N,)): a group whose
    rewards are all equal has zero advantage and teaches nothing (TRL #2703).
    """
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    has_signal = std.squeeze(1) > eps
    advantages = (grouped - mean) / (std + eps)
    return advantages.flatten(), has_signal


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    kl_coef: float,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO objective (arXiv:2402.03300 eq. 3) with the k3 KL to the reference (eq. 4), negated for descent.

    Per token: min(ρÂ, clip(ρ, 1±ε)Â) - β·KL_k3; averaged over each reply's tokens, then over replies (eq. 3).
    logprobs/old/ref/mask (B, T); advantages (B,) one per reply.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    kl = kl_k3(logprobs, ref_logprobs)  # eq. 4
    per_token = surrogate - kl_coef * kl
    loss = -masked_mean(masked_mean(per_token, mask, dim=1), None)  # eq. 3: 1/|o_i| Σ_t, then 1/G Σ_i
    with torch.no_grad():
        clip_frac = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)
        mean_kl = masked_mean(kl, mask)
    return loss, {"kl": float(mean_kl), "clip_frac": float(clip_frac)}


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, mask: Tensor | None, alpha: float, temperature: float
) -> tuple[Tensor, dict[str, float]]:
    """α·CE(y, student) + (1-α)·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) (Hinton et al. 2015, arXiv:1503.02531)."""
    ce = cross_entropy_loss(student_logits, targets, mask)
    t = temperature
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    kl_per_token = (teacher.exp() * (teacher - student)).sum(-1)  # (B, T)
    kl = masked_mean(kl_per_token, mask)
    loss = alpha * ce + (1 - alpha) * t * t * kl  # T² keeps gradient scale independent of T
    return loss, {"ce": float(ce.detach()), "kl_teacher": float(kl.detach())}


def load_balancing_loss(router_probs: Tensor, expert_index: Tensor, n_experts: int) -> Tensor:
    """Switch Transformer aux loss (Fedus et al. 2021, arXiv:2101.03961 eq. 4): E·Σ_i f_i·P_i; 1.0 when uniform.

    router_probs (N, E) softmax over experts; expert_index (N, k) chosen experts per token.
    """
    one_hot = F.one_hot(expert_index, n_experts).float().sum(dim=1)  # (N, E)
    fraction = one_hot.mean(0) / expert_index.shape[1]  # f_i: share of routed slots
    prob = router_probs.float().mean(0)  # P_i: mean router probability
    return n_experts * (fraction * prob).sum()  # eq. 4


def router_z_loss(router_logits: Tensor) -> Tensor:
    """mean(logsumexp(logits)²) keeps router logits small (ST-MoE, Zoph et al. 2022, arXiv:2202.08906 eq. 5)."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()
