"""ScalarModel: the GPT trunk with a linear head giving one number per sequence (reward) or per token (value).

Reward models (InstructGPT §3.5) and PPO's value model share this shape. The reward is read at each sequence's
LAST REAL token: with right padding that is position length-1, not -1; with left padding it is -1 and the trunk
must be told which tokens are pads. Reading a pad position is a classic bug (TRL #937, #3750).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm.config import ModelConfig, from_dict
from scratchllm.model.gpt import GPT
from scratchllm.model.io import CheckpointError, check_tokenizer, read_tensors, save_model
from scratchllm.tokenizer.bpe import Tokenizer


def last_real_index(lengths: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
    """(B,) index of each row's last real token, from lengths (right padding) or a mask (any padding).

    attention_mask [[0 0 1 1 1]] (left-padded) -> [4];  [[1 1 1 0 0]] (right-padded) -> [2];  lengths [3] -> [2].
    """
    if attention_mask is not None:
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
    elif lengths is not None:
        last = lengths - 1
    else:
        raise ValueError("give lengths (right padding) or attention_mask: reading position -1 scores pads (TRL #937)")
    if bool((last < 0).any()):
        raise ValueError("a row has no real token (length 0 or an all-False attention_mask): nothing to score")
    return last


class ScalarModel(nn.Module):
    """GPT trunk (its final-normed hidden states) -> nn.Linear(d_model, 1) named `score`."""

    def __init__(self, trunk: GPT) -> None:
        super().__init__()
        self.trunk = trunk
        self.score = nn.Linear(trunk.config.d_model, 1)
        # std 1/sqrt(d+1) (as in InstructGPT's RM init, via TRL): initial rewards are O(1), not O(sqrt(d))
        nn.init.normal_(self.score.weight, std=1.0 / (trunk.config.d_model + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    @property
    def config(self) -> ModelConfig:
        return self.trunk.config

    def forward_all(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Per-token scalars (B, T) in float32: the value model of PPO. Values at pad positions are meaningless."""
        hidden = self.trunk.forward_hidden(ids, attention_mask=attention_mask)  # (B, T, d_model)
        return self.score(hidden).squeeze(-1).float()

    def forward(self, ids: Tensor, lengths: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """One scalar per sequence (B,), read at the last real token.

        lengths (B,) for right-padded ids; or attention_mask (B, T), True = real token, for left or right padding
        (the mask also reaches the trunk, so left pads are neither attended to nor counted in positions).
        """
        last = last_real_index(lengths, attention_mask)
        values = self.forward_all(ids, attention_mask)
        return values.gather(1, last[:, None]).squeeze(1)


def save_scalar_model(
    directory: str | Path, model: ScalarModel, tokenizer: Tokenizer | None, config_sections: dict[str, Any]
) -> Path:
    """Atomic model directory: model.safetensors (trunk.* and score.weight/bias), config.json with "head": "scalar"."""
    return save_model(directory, model, tokenizer, {**config_sections, "head": "scalar"})  # type: ignore[arg-type]


def load_scalar_model(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[ScalarModel, Tokenizer | None]:
    """Inverse of save_scalar_model -> (ScalarModel in eval mode, Tokenizer or None if none was saved)."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.exists() or not weights_path.exists():
        raise CheckpointError(f"{directory}: not a model directory (needs config.json and model.safetensors)")
    config = json.loads(config_path.read_text())
    if config.get("head") != "scalar":
        raise CheckpointError(f'{directory}: not a reward/value model (config.json lacks "head": "scalar"); '
                              "load a plain GPT with model/io.py:load_model")
    model = ScalarModel(GPT(from_dict(ModelConfig, config["model"])))
    missing, unexpected = model.load_state_dict(read_tensors(weights_path), strict=False)
    allowed_missing = {"trunk.lm_head.weight"} if model.config.tie_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise CheckpointError(f"{directory}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    tokenizer_path = directory / "tokenizer.json"
    tokenizer = Tokenizer.load(tokenizer_path) if tokenizer_path.exists() else None
    if tokenizer is not None:
        check_tokenizer(directory, model.config, tokenizer, config)
    return model.to(device).eval(), tokenizer
