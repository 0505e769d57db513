"""Model directories: a model's weights (safetensors), resolved config (JSON) and tokenizer, saved atomically
and loaded without ever unpickling.

A *model directory* (`final/`, or anything `load_model` reads) holds `model.safetensors`, `config.json` and
`tokenizer.json`. Every write goes to a temporary directory that is renamed into place (minimind's pattern), so a
killed save leaves the last one loadable. Training checkpoints (train/checkpoint.py) add the optimizer, step and
RNG state to the same files; evaluation, inference and export need only this module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scratchllm.config import ModelConfig, from_dict
from scratchllm.errors import UserError
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer

CHECKPOINT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or from an incompatible version."""


def atomic_dir(final: Path) -> Path:
    """A fresh `<final>.tmp` directory to fill; `commit_dir` renames it into place."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a filled `tmp` to `final`, replacing any earlier `final` only once `tmp` is complete."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (no code is ever executed); an unreadable file is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises SafetensorError / OSError variants; a bare one names no file
        raise CheckpointError(f"{path}: unreadable safetensors file ({err}); it may be truncated by a full disk or "
                              "an interrupted copy: use an earlier checkpoint or copy it again") from None


def tied_names(model: nn.Module) -> set[str]:
    """State-dict names whose tensor is shared with an earlier name (tied embeddings): saved once, re-tied on load."""
    seen: set[int] = set()
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        seen.add(tensor.data_ptr())
    return tied


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict ready for safetensors: shared (tied) tensors kept once, since safetensors refuses aliases."""
    skip = tied_names(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in skip}


def write_model_files(directory: Path, model: GPT, tokenizer: Tokenizer | None, sections: dict[str, Any]) -> None:
    save_file(model_tensors(model), str(directory / "model.safetensors"))
    write_config(directory, model, sections, tokenizer)
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")


def write_config(directory: Path, model: nn.Module | None, sections: dict[str, Any],
                 tokenizer: Tokenizer | None = None) -> None:
    """config.json: the resolved sections, the model's own config when a model is given, and what identifies the
    tokenizer saved beside it (checked by `check_tokenizer` when loaded)."""
    meta = {"format_version": CHECKPOINT_VERSION, **sections}
    if model is not None:
        meta["model"] = _model_config_dict(model)
    if tokenizer is not None:
        meta["tokenizer"] = {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                             "special_tokens": tokenizer.special_tokens}
    (directory / "config.json").write_text(json.dumps(meta, indent=2, default=str))


def _model_config_dict(model: nn.Module) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(model.config)


def save_model(directory: str | Path, model: GPT, tokenizer: Tokenizer | None, config_sections: dict[str, Any]) -> Path:
    """Write a model directory atomically."""
    directory = Path(directory)
    tmp = atomic_dir(directory)
    write_model_files(tmp, unwrap(model), tokenizer, config_sections)
    commit_dir(tmp, directory)
    return directory


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Model directory (or training checkpoint) -> (GPT in eval mode, Tokenizer, resolved config dict)."""
    path = Path(path)
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    if not config_path.exists() or not weights_path.exists():
        raise CheckpointError(f"{path}: not a model directory (needs config.json and model.safetensors)")
    config = json.loads(config_path.read_text())
    if config.get("format_version", 1) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: written by a newer scratchllm (format {config['format_version']})")
    model = GPT(from_dict(ModelConfig, config["model"]))
    state = read_tensors(weights_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    check_tokenizer(path, model.config, tokenizer, config)
    return model.to(device).eval(), tokenizer, config


def check_tokenizer(path: Path, model_config: ModelConfig, tokenizer: Tokenizer, config: dict[str, Any]) -> None:
    """Refuse a tokenizer.json that does not belong to the weights beside it: its ids must index the embedding,
    and it must be the tokenizer recorded in config.json when the model was saved (older saves record none).

    A smaller tokenizer from another run loads and generates mojibake; a larger one fails deep in the embedding."""
    fix = "put the tokenizer.json the model was trained with beside it"
    if tokenizer.vocab_size > model_config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens but the model's vocabulary "
                              f"has {model_config.vocab_size}: its ids would index past the embedding; {fix}")
    recorded = config.get("tokenizer")
    if not isinstance(recorded, dict):
        return
    for key, now in (("vocab_size", tokenizer.vocab_size), ("special_tokens", tokenizer.special_tokens),
                     ("fingerprint", tokenizer.fingerprint())):
        if key in recorded and recorded[key] != now:
            raise CheckpointError(f"{path}: tokenizer.json is not the tokenizer this model was saved with ({key} "
                                  f"{now} here, {recorded[key]} in config.json); {fix}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module  # DDP
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        else:
            return model
