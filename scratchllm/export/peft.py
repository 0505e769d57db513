"""LoRA adapters in the PEFT format (`adapter_config.json` + `adapter_model.safetensors`), both ways.

PEFT's LoRA is ours (model/lora.py): ΔW = (lora_alpha/r)·B A with A (r, d_in) and B (d_out, r), so moving an
adapter is a rename: `layers.0.self_attn.q_proj.lora_A` <-> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
Variants that are not plain LoRA (DoRA, per-module ranks, biases, extra trained modules) are refused with the
reason, never half-loaded. rsLoRA (scaling α/√r, Kalajdzievski 2023) is converted to an equal α/r.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scratchllm.config import LoRAConfig
from scratchllm.export.hf import from_hf_name, to_hf_name
from scratchllm.model.lora import AdapterFormatError, apply_adapter, load_adapter

PEFT_PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def is_peft_adapter(directory: Path) -> bool:
    """True for a folder written by PEFT's save_pretrained (its adapter_config.json names a peft_type)."""
    config = Path(directory) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return "peft_type" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def to_peft_name(ours: str) -> str:
    """"layers.0.self_attn.q_proj.lora_A" -> "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"."""
    module, which = ours.rsplit(".", 1)
    return f"{PEFT_PREFIX}{to_hf_name(module + '.weight').removesuffix('.weight')}.{which}.weight"


def from_peft_name(theirs: str) -> str:
    """The inverse of to_peft_name; PEFT's adapter-name infix (`lora_A.default.weight`) is accepted too."""
    name = theirs.removeprefix(PEFT_PREFIX).removesuffix(".weight").replace(".default", "")
    module, which = name.rsplit(".", 1)
    return f"{from_hf_name(module)}.{which}"


def save_peft_adapter(directory: Path, adapter: dict[str, Tensor], cfg: LoRAConfig,
                      base_model: str = "") -> Path:
    """Write `adapter` (model/lora.py's lora_state_dict) as a PEFT LoRA adapter folder, atomically per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = sorted({k.rsplit(".", 1)[0] for k in adapter})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        # subtle: the exact module paths, not last components: a last component would also match modules
        # a stage chose not to adapt, and PEFT would add zero adapters where ours has none
        "target_modules": [to_hf_name(m + ".weight").removesuffix(".weight") for m in modules],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    tensors = {to_peft_name(k): v.detach().contiguous().cpu() for k, v in adapter.items()}
    save_file(tensors, str(directory / (WEIGHTS_NAME + ".tmp")), metadata={"format": "pt"})
    (directory / (CONFIG_NAME + ".tmp")).write_text(json.dumps(config, indent=2))
    os.replace(directory / (WEIGHTS_NAME + ".tmp"), directory / WEIGHTS_NAME)
    os.replace(directory / (CONFIG_NAME + ".tmp"), directory / CONFIG_NAME)
    return directory


def read_peft_adapter(directory: Path) -> tuple[LoRAConfig, dict[str, Tensor]]:
    """(our LoRAConfig, our adapter state dict) from a PEFT LoRA folder; refuses what plain LoRA cannot express."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterFormatError(f"{directory}: no {WEIGHTS_NAME}; save the adapter with PEFT's "
                                 "save_pretrained(..., safe_serialization=True) (pickled .bin files are never loaded)")
    meta = json.loads(config_path.read_text())
    where = f"{config_path}"
    if meta.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {meta.get('peft_type')!r}; only LORA adapters can be loaded")
    unsupported = {
        "use_dora": "DoRA adds a magnitude vector plain LoRA does not have",
        "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
        "modules_to_save": "fully trained extra modules", "fan_in_fan_out": "transposed (Conv1D) weights",
    }
    for key, why in unsupported.items():
        if meta.get(key):
            raise AdapterFormatError(f"{where}: {key} is set ({why}); re-train the adapter without it")
    if meta.get("bias", "none") != "none":
        raise AdapterFormatError(f"{where}: bias={meta['bias']!r} trains biases our layers do not have; use bias='none'")
    r = int(meta["r"])
    alpha = float(meta.get("lora_alpha", r))
    if meta.get("use_rslora"):
        alpha *= math.sqrt(r)  # rsLoRA scales by α/√r; the same update with our α/r scaling needs α·√r
    state = {}
    for name, tensor in load_file(str(weights_path)).items():
        if ".lora_A" not in name and ".lora_B" not in name:
            raise AdapterFormatError(f"{weights_path}: tensor {name!r} is not a LoRA A/B matrix (lora_embedding or "
                                     "other trained weights are not supported)")
        state[from_peft_name(name)] = tensor
    targets = sorted({k.rsplit(".", 2)[-2] for k in state})
    cfg = LoRAConfig(r=r, alpha=alpha, dropout=float(meta.get("lora_dropout", 0.0)), target_modules=",".join(targets))
    return cfg, state


def load_any_adapter(directory: str | Path, model: nn.Module) -> LoRAConfig:
    """Our adapter folder (model/lora.py's save_adapter) or PEFT's, injected into `model` and loaded: what
    `scratchllm generate --lora` and `scratchllm export --adapter` take."""
    if is_peft_adapter(Path(directory)):
        cfg, saved = read_peft_adapter(Path(directory))
        apply_adapter(directory, model, cfg, saved)
        return cfg
    return load_adapter(directory, model)
