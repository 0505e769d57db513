"""ScalarModel: the GPT trunk with a linear head giving one number per sequence (reward) or per token (value).

The reward is read at each sequence's LAST REAL token: with right padding that is position length-1, not
-1 (reading the pad position is a classic bug, TRL #937 / #3750).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scratchllm.config import ModelConfig, from_dict
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer


class ScalarModel(nn.Module):
    def __init__(self, trunk: GPT) -> None:
        super().__init__()
        self.trunk = trunk
        self.score = nn.Linear(trunk.config.d_model, 1)
        nn.init.normal_(self.score.weight, std=1.0 / (trunk.config.d_model + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    @property
    def config(self) -> ModelConfig:
        return self.trunk.config

    def forward_all(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Per-token scalars (B, T): the value model of PPO."""
        return self.score(self.trunk.forward_hidden(ids, attention_mask=attention_mask)).squeeze(-1).float()

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """One scalar per right-padded sequence (B,), read at index lengths-1."""
        values = self.forward_all(ids)
        return values.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)


def save_scalar_model(directory: Path, model: ScalarModel, tokenizer: Tokenizer, sections: dict[str, Any]) -> None:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("trunk.lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"))
    config = {"format_version": 1, "head": "scalar", **sections, "model": asdict(model.config)}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save(tmp / "tokenizer.json")
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    tmp.replace(directory)


def load_scalar_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[ScalarModel, Tokenizer]:
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("head") != "scalar":
        raise ValueError(f"{directory}: not a reward/value model (config.json has no \"head\": \"scalar\")")
    model = ScalarModel(GPT(from_dict(ModelConfig, config["model"])))
    missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"trunk.lm_head.weight"}:
        raise ValueError(f"{directory}: weights do not match (missing {missing}, unexpected {unexpected})")
    return model.to(device).eval(), Tokenizer.load(directory / "tokenizer.json")
