"""AdamW (Loshchilov & Hutter 2019) with decay / no-decay groups, and the warmup + cosine learning-rate schedule.

Matrices (linear and embedding weights) decay; vectors (norm gains, biases) do not — decaying a norm gain
pulls it toward zero and fights the normalisation. Fused AdamW is used where PyTorch offers it (CUDA).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scratchllm.config import OptimConfig


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    seen: set[int] = set()
    decay, no_decay = [], []
    for _, param in named_params:
        if not param.requires_grad or id(param) in seen:  # tied weights appear twice
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(progress: float, step: int, cfg: OptimConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr to lr·min_lr_ratio as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
