"""AdamW (Loshchilov & Hutter 2019) with decay / no-decay groups, optionally Muon for the hidden matrices, and the
warmup + cosine learning-rate schedule.

Matrices (linear and embedding weights) decay; vectors (norm gains, biases) do not — decaying a norm gain
pulls it toward zero and fights the normalisation. Fused AdamW is used where PyTorch offers it (CUDA).

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; used by modded-nanogpt and
nanochat) replaces each hidden matrix's update by the nearest semi-orthogonal matrix to its Nesterov momentum,
found with a few Newton-Schulz iterations: every direction of the update moves by the same amount, so rare
directions (a feature few tokens use) are not drowned by common ones. Embeddings, the output head and vectors
stay on AdamW, as in those projects. With `--optim.muon_lr=0` (the default) every parameter uses AdamW.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scratchllm.config import OptimConfig


def newton_schulz_orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for matrix = U S V^T (every singular value pushed to ~1), by an odd quintic iteration
    X <- aX + b(XX^T)X + c(XX^T)^2 X whose coefficients (Jordan et al. 2024) drive small singular values up fast;
    it converges to values in ~[0.7, 1.2], not exactly 1, which Muon tolerates. Works on the wide orientation
    (rows <= columns) so X X^T is the small Gram matrix. `matrix` is (rows, cols) or a stack (n, rows, cols),
    each orthogonalised on its own: one batched matmul for n same-shaped matrices costs less than n small ones."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the basin
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(matrix.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two rules: groups with `muon=True` take Muon steps (Nesterov momentum, orthogonalised,
    scaled by sqrt(max(1, rows/cols)) so tall and wide matrices move alike), the rest AdamW steps. One object keeps
    checkpoints, resume and the loop's schedule (`lr` per group, set every step) unchanged."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, momentum: float = 0.95) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, muon=False))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(params, group)
            else:
                for p in params:
                    self._adamw_step(p, group)

    def _muon_step(self, params: list[torch.Tensor], group: dict) -> None:
        updates = []
        for p in params:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.mul_(group["momentum"]).add_(p.grad)
            updates.append(p.grad.add(buf, alpha=group["momentum"]))  # Nesterov
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for shape, indices in by_shape.items():  # every layer's q (or gate, ...) orthogonalised in one batch
            orthogonal = newton_schulz_orthogonalize(torch.stack([updates[i] for i in indices]))
            scale = max(1.0, shape[0] / shape[1]) ** 0.5  # tall and wide matrices move alike
            for i, update in zip(indices, orthogonal):
                params[i].mul_(1 - group["lr"] * group["weight_decay"])
                params[i].add_(update, alpha=-group["lr"] * scale)

    def _adamw_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """A 2-D weight inside the blocks: Muon's domain. Embeddings and the output head are lookups / a classifier
    whose rows see very different gradient scales; they stay on AdamW."""
    return param.dim() == 2 and not any(part in name for part in ("embed_tokens", "lm_head", "score"))


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    seen: set[int] = set()
    decay, no_decay, hidden = [], [], []
    for name, param in named_params:
        if not param.requires_grad or id(param) in seen:  # tied weights appear twice
            continue
        seen.add(id(param))
        if cfg.muon_lr > 0 and is_hidden_matrix(name, param):
            hidden.append(param)
        else:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.muon_lr > 0:
        # the schedule multiplies each group's lr_scale: Muon's step size is on another scale than Adam's
        groups.append({"params": hidden, "weight_decay": cfg.weight_decay, "muon": True, "lr_scale": cfg.muon_lr / cfg.lr})
        return MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(progress: float, step: int, cfg: OptimConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr to lr·min_lr_ratio as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
