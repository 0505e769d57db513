"""Mixture-of-Experts MLP: a top-k softmax router over E SwiGLU experts, plus optional always-on shared experts.

Replaces the dense SwiGLU in `Block` when `--model.n_experts > 0`. References: sparsely-gated MoE (Shazeer et al.
2017, arXiv:1701.06538); load-balancing loss (Switch Transformer, Fedus et al. 2021, arXiv:2101.03961 eq. 4-6);
router z-loss (ST-MoE, Zoph et al. 2022, arXiv:2202.08906 eq. 5); shared experts (DeepSeekMoE, arXiv:2401.06066).
Deviations: no expert capacity, so no token is ever dropped ("dropless", as in MegaBlocks, arXiv:2211.15841);
padding tokens count in the balance statistics. The training loop adds `moe_aux_loss(model)` to every stage's loss;
the two loss functions are below, beside the router they train.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from scratchllm.config import ModelConfig
from scratchllm.model.mlp import SwiGLU


def load_balancing_loss(router_probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch Transformer aux loss (Fedus et al. 2021, arXiv:2101.03961 eq. 4): E·Σ_i f_i·P_i, without the α weight.

    router_probs (N, E) softmax over experts; expert_index (N, k) experts chosen per token. f_i is the share of
    the N·k routing slots sent to expert i (eq. 5, counted over all k choices so Σ f = 1), P_i the mean router
    probability (eq. 6). Only P carries gradient. Equals 1 for a uniform router whatever f is, its minimum when
    f is uniform; grows to E when everything goes to one expert with certainty.
    """
    n_experts = router_probs.shape[-1]
    fraction = torch.bincount(expert_index.reshape(-1), minlength=n_experts).float() / expert_index.numel()  # eq. 5
    prob = router_probs.float().mean(0)  # eq. 6
    return n_experts * (fraction * prob).sum()  # eq. 4


def router_z_loss(router_logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, arXiv:2202.08906 eq. 5): mean over tokens of (log Σ_j e^{x_j})².

    router_logits (N, E). Penalises large logits so the router's softmax stays in a numerically safe range.
    """
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()  # eq. 5


class MoE(nn.Module):
    """(B, T, d_model) -> (B, T, d_model): each token goes through its top-k experts, outputs mixed by the gates."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.n_experts_active
        self.aux_loss_coef, self.z_loss_coef = config.moe_aux_loss_coef, config.moe_z_loss_coef
        d_expert = config.resolved_d_ff_expert
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)  # HF Mixtral/Qwen-MoE call it `gate`
        self.experts = nn.ModuleList(SwiGLU(config.d_model, d_expert) for _ in range(config.n_experts))
        # n shared experts of width d == one SwiGLU of width n·d (their hidden units just concatenate)
        self.shared_expert = (
            SwiGLU(config.d_model, config.n_shared_experts * d_expert) if config.n_shared_experts else None
        )
        self.expert_fraction: Tensor | None = None  # (E,) share of assignments per expert, last forward, detached
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (balance, z, fraction) per training forward

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        # The router runs in float32 even under bf16 autocast: its softmax decides discrete routes (Switch §2.4).
        # Called as a module (not F.linear on its weight) so a LoRA or quantized wrapper of it still takes effect.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.router(flat.to(self.router.weight.dtype)).float()  # (N, E)
        probs = logits.softmax(dim=-1)
        top_p, expert_idx = probs.topk(self.top_k, dim=-1)  # (N, k)
        # k > 1: renormalise over the chosen experts (Mixtral). k = 1: keep the raw probability as in Switch (eq. 2),
        # because a renormalised single gate is the constant 1 and the router would learn from the aux loss only.
        gates = top_p / top_p.sum(dim=-1, keepdim=True) if self.top_k > 1 else top_p
        y = self._dispatch(flat, expert_idx, gates)
        if self.shared_expert is not None:
            y = y + self.shared_expert(flat)
        self._record(logits, probs, expert_idx)
        return y.view(B, T, C)

    def _dispatch(self, x: Tensor, expert_idx: Tensor, gates: Tensor) -> Tensor:
        """Group the N·k (token, expert) assignments by expert, run each expert once on its rows, scatter back.

        Worked example, N=3 tokens, k=1, expert_idx = [[1], [0], [1]]: order = [1, 0, 2], counts = [1, 2], so
        expert 0 sees row x[1] and expert 1 sees rows x[0], x[2]; index_add_ returns each output to its token.
        """
        N, k = expert_idx.shape
        flat_expert = expert_idx.reshape(-1)  # (N·k,) assignment a belongs to token a // k
        order = flat_expert.argsort(stable=True)  # assignments grouped by expert, token order kept inside a group
        token_of = order // k  # (N·k,) source token of each sorted assignment
        counts = torch.bincount(flat_expert, minlength=self.n_experts).tolist()  # one host sync per layer
        rows = x[token_of].split(counts)  # E chunks of (count_e, C)
        # subtle: experts with no rows still run (on an empty tensor), so every parameter stays in the graph
        # and DDP does not fail on unused parameters.
        outputs = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, rows)])  # (N·k, C)
        weighted = outputs * gates.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, weighted.to(x.dtype))

    def _record(self, logits: Tensor, probs: Tensor, expert_idx: Tensor) -> None:
        fraction = torch.bincount(expert_idx.reshape(-1), minlength=self.n_experts).float() / expert_idx.numel()
        self.expert_fraction = fraction.detach()
        # Only forwards that will be backpropagated count: evaluation, generation and frozen copies add nothing.
        if self.training and torch.is_grad_enabled():
            self._pending.append((load_balancing_loss(probs, expert_idx), router_z_loss(logits), fraction))

    def pop_aux(self) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Weighted aux loss and its parts, averaged over the training forwards since the last call; then forget them.

        Averaging (not summing) keeps the scale independent of how often a stage calls the model per loss (DPO: twice).
        """
        if not self._pending:
            return None
        balance, z, fraction = (torch.stack(parts).mean(0) for parts in zip(*self._pending))
        self._pending.clear()
        weighted = self.aux_loss_coef * balance + self.z_loss_coef * z
        return weighted, {"balance": balance.detach(), "z": z.detach(), "max_fraction": fraction.max()}

    def __getstate__(self) -> dict[str, Any]:
        # subtle: pending losses carry autograd graphs, which deepcopy refuses; a copy (a frozen reference)
        # starts with none.
        state = dict(super().__getstate__())
        state["_pending"] = []
        return state


def moe_aux_loss(model: nn.Module) -> tuple[Tensor | float, dict[str, float]]:
    """Sum over MoE layers of their weighted aux losses since the last call, and utilisation stats for the log.

    Called by the training loop after every `stage.loss`, so any stage trains its experts balanced without knowing
    about them. The aux losses add up over layers as in Switch Transformer; a dense model returns (0.0, {}).
    The stats are layer means of the unweighted balance loss (1 = perfectly balanced) and z-loss, and the largest
    share of tokens any one expert received in any layer (1/E = balanced, 1 = collapsed).
    """
    popped = [aux for m in model.modules() if isinstance(m, MoE) and (aux := m.pop_aux()) is not None]
    if not popped:
        return 0.0, {}
    total = torch.stack([loss for loss, _ in popped]).sum()
    balance = torch.stack([s["balance"] for _, s in popped]).mean()
    z = torch.stack([s["z"] for _, s in popped]).mean()
    max_fraction = torch.stack([s["max_fraction"] for _, s in popped]).max()
    values = torch.stack([total.detach(), balance, z, max_fraction]).tolist()  # one host sync for all four
    names = ("moe_aux_loss", "moe_balance_loss", "moe_z_loss", "moe_max_expert_fraction")
    return total, dict(zip(names, values))
