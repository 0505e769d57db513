"""LoRA (Hu et al. 2021, arXiv:2106.09685): W x + (α/r)·B A x with A random, B zero, W frozen.

An option on any stage (`--lora.r=8`): inject adapters, train only them, then merge for the final model.
B = 0 at start, so the adapted model begins exactly equal to the base model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scratchllm.config import LoRAConfig


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base, self.r, self.scaling = base, r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        base.weight.requires_grad_(False)

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    def delta(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # ΔW = (α/r)·B A (eq. 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if not self.merged:
            out = out + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        return out

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def _targets(cfg: LoRAConfig) -> set[str]:
    return {t.strip() for t in cfg.target_modules.split(",") if t.strip()}


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every nn.Linear whose last name component is a target (or all but lm_head for "all-linear")."""
    targets = _targets(cfg)
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or child_name == "lm_head":
                continue  # lm_head is tied to the embeddings: never a default target
            if "all-linear" in targets or child_name in targets:
                setattr(module, child_name, LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout))
                replaced.append(full)
    if not replaced:
        raise ValueError(f"--lora.target_modules={cfg.target_modules!r} matched no linear layer")
    for pname, param in model.named_parameters():
        param.requires_grad_("lora_" in pname)
    return replaced


def maybe_inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    if cfg.r <= 0:
        return []
    replaced = inject_lora(model, cfg)
    trainable, total = count_trainable(model)
    print(f"[lora] r={cfg.r} on {len(replaced)} layers: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return replaced


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                child.base.weight.requires_grad_(True)
                setattr(module, child_name, child.base)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


def save_adapter(directory: Path, model: nn.Module, cfg: LoRAConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), str(directory / "adapter.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
                                                               "target_modules": cfg.target_modules}))


def load_adapter(directory: Path, model: nn.Module) -> LoRAConfig:
    meta = json.loads((directory / "adapter_config.json").read_text())
    cfg = LoRAConfig(**meta)
    inject_lora(model, cfg)
    missing = set(lora_state_dict(model)) - set(load_file(str(directory / "adapter.safetensors")))
    if missing:
        raise ValueError(f"{directory}: adapter lacks {sorted(missing)[:3]}…")
    model.load_state_dict(load_file(str(directory / "adapter.safetensors")), strict=False)
    return cfg


def count_trainable(model: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_final_model(model: nn.Module, tokenizer: Any, directory: Path, sections: dict[str, Any]) -> None:
    """final/ is always a plain model directory: adapters are saved beside it, then merged in."""
    from scratchllm.train.checkpoint import save_model

    if has_lora(model):
        save_adapter(directory.with_name(directory.name + "_adapter"), model, sections["lora"])
        merge_lora(model)
    save_model(directory, model, tokenizer, sections)
