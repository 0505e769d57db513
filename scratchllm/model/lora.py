"""LoRA (Hu et al. 2021, arXiv:2106.09685): h = W₀x + (α/r)·B A x (eq. 3) with W₀ frozen, A random, B zero.

An option on any stage (`--lora.r=8`): inject adapters, train only them, save them alone, then merge them into W₀
for the final model. B = 0 at start, so the adapted model begins exactly equal to the base model.
Scaling by α/r (§4.1) lets r change without retuning the learning rate.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scratchllm.config import LoRAConfig
from scratchllm.errors import UserError

# Output heads are never adapted by "all-linear": lm_head shares its weight with embed_tokens (tied), and a
# rank-r update of the 1-wide reward/value `score` head would be larger than the head itself.
NEVER_TARGETS = frozenset({"lm_head", "score"})


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update: y = base(x) + (α/r)·B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got --lora.r={r}")
        self.base, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))  # (d_out, r)
        # A like a fresh nn.Linear (kaiming-uniform), B = 0 (§4.1): ΔW = BA = 0 at step 0, yet ∂L/∂B ≠ 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def weight(self) -> Tensor:
        """The base weight, so code that reads `.weight` (tying, export, init) still finds one."""
        return self.base.weight

    def delta(self) -> Tensor:
        """ΔW = (α/r)·B A, shape (d_out, d_in)."""
        return (self.lora_B @ self.lora_A) * self.scaling  # eq. 3

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if not self.merged:
            out = out + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling  # eq. 3
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """W₀ ← W₀ + ΔW: inference then costs nothing extra (§4.1, "no additional inference latency")."""
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W₀ ← W₀ - ΔW, back to the adapter form (exact up to float rounding)."""
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def parse_targets(target_modules: str) -> set[str]:
    """"q_proj, v_proj" -> {"q_proj", "v_proj"}; names match the LAST component of a module path."""
    return {t.strip() for t in target_modules.split(",") if t.strip()}


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Replace each targeted nn.Linear by a LoRALinear in place; freeze every non-adapter parameter.

    cfg.target_modules: comma-separated last name components (q_proj,v_proj,gate_proj), or "all-linear" for every
    nn.Linear except the output heads (NEVER_TARGETS). Returns the full names of the replaced modules.
    Already-adapted layers are left alone, so injecting twice never nests adapters.
    """
    targets = parse_targets(cfg.target_modules)
    all_linear = "all-linear" in targets
    shared = _shared_parameter_ids(model)
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            continue  # its `base` is an nn.Linear too: wrapping it would nest adapters
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            wanted = child_name in targets or (all_linear and child_name not in NEVER_TARGETS)
            if not isinstance(child, nn.Linear) or not wanted:
                continue
            if id(child.weight) in shared:
                # subtle: merging into a tied weight would also change the embedding it is tied to
                raise ValueError(f"{full}.weight is tied to another parameter; remove {child_name!r} from "
                                 "--lora.target_modules")
            setattr(module, child_name, LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout))
            replaced.append(full)
    if not replaced and not has_lora(model):
        raise ValueError(f"--lora.target_modules={cfg.target_modules!r} matched no nn.Linear; names are matched on "
                         "their last component, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    for pname, param in model.named_parameters():
        param.requires_grad_("lora_" in pname)
    return replaced


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


def maybe_inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """inject_lora when --lora.r > 0 (and say how much is trained); a no-op otherwise."""
    if cfg.r <= 0:
        return []
    replaced = inject_lora(model, cfg)
    trainable, total = count_trainable(model)
    print(f"[lora] r={cfg.r} on {len(replaced)} layers: training {trainable:,} of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")
    return replaced


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back, in place.

    The result is a plain model: no lora_* parameters remain and every parameter is trainable again.
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, child_name, child.base)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors only (`...q_proj.lora_A`, `...q_proj.lora_B`), detached, on CPU: what save_adapter writes."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


def save_adapter(directory: str | Path, model: nn.Module, cfg: LoRAConfig) -> None:
    """adapter.safetensors (lora_state_dict) + adapter_config.json (r, alpha, dropout, targets, adapted modules)."""
    save_adapter_state(directory, lora_state_dict(model), cfg)


def save_adapter_state(directory: str | Path, adapter: dict[str, Tensor], cfg: LoRAConfig) -> None:
    """save_adapter for adapter tensors already in hand (e.g. converted from PEFT by `import-hf`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = sorted(k.rsplit(".", 1)[0] for k in adapter if k.endswith("lora_A"))
    meta = {"format_version": 1, "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "target_modules": cfg.target_modules, "modules": modules}
    # write-then-rename: a killed save never leaves a half-written adapter behind
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(directory / "adapter.safetensors.tmp"))
    (directory / "adapter_config.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(directory / "adapter.safetensors.tmp", directory / "adapter.safetensors")
    os.replace(directory / "adapter_config.json.tmp", directory / "adapter_config.json")


class AdapterFormatError(UserError, ValueError):
    """An adapter folder cannot be loaded into this model as a plain LoRA adapter; the message says why."""


def check_adapter_fits(directory: Path, adapter: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Same names and shapes as the adapters `model` has after injection, or a message saying what differs."""
    if set(adapter) != set(expected):
        raise AdapterFormatError(
            f"{directory}: adapter does not fit this model (missing {sorted(set(expected) - set(adapter))[:3]}, "
            f"unexpected {sorted(set(adapter) - set(expected))[:3]}); was it trained on another base model?")
    for name, tensor in adapter.items():
        if tensor.shape != expected[name].shape:
            raise AdapterFormatError(f"{directory}: {name} has shape {tuple(tensor.shape)}, this model needs "
                                     f"{tuple(expected[name].shape)}; was it trained on another base model?")


def apply_adapter(directory: str | Path, model: nn.Module, cfg: LoRAConfig, saved: dict[str, Tensor]) -> None:
    """Inject adapters as `cfg` describes into a base model and load the `saved` tensors read from `directory`."""
    inject_lora(model, cfg)
    expected = lora_state_dict(model)
    check_adapter_fits(Path(directory), saved, expected)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in saved.items()}, strict=False)


def load_adapter(directory: str | Path, model: nn.Module) -> LoRAConfig:
    """Inject adapters as saved by `save_adapter` (same r, alpha, targets) into a base model and load their weights.

    PEFT's adapter folders load through export/peft.py's `load_any_adapter` (what `--lora` and `--adapter` call)."""
    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter.safetensors"
    if not (config_path.exists() and weights_path.exists()):
        raise FileNotFoundError(f"{directory}: not an adapter directory (needs adapter_config.json with "
                                "adapter.safetensors, as written by save_adapter, or adapter_model.safetensors, "
                                "as written by PEFT's save_pretrained)")
    meta = json.loads(config_path.read_text())
    cfg = LoRAConfig(r=int(meta["r"]), alpha=float(meta["alpha"]), dropout=float(meta["dropout"]),
                     target_modules=str(meta["target_modules"]))
    apply_adapter(directory, model, cfg, load_file(str(weights_path)))
    return cfg


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared (tied) tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_final_model(model: nn.Module, tokenizer: Any, directory: Path, sections: dict[str, Any]) -> None:
    """final/ is always a plain model directory: adapters are saved beside it (final_adapter/), then merged in."""
    from scratchllm.model.io import save_model

    if has_lora(model):
        save_adapter(directory.with_name(directory.name + "_adapter"), model, sections["lora"])
        merge_lora(model)
    save_model(directory, model, tokenizer, sections)
