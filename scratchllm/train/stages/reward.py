"""Reward model: the SFT trunk + a scalar head, trained on preference pairs with the Bradley–Terry loss.

Headline metric: held-out pairwise accuracy on prefs_val (and per rejection rule). The reward is read at
each sequence's last real token (model/heads.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm.config import LoopConfig, OptimConfig, RewardConfig
from scratchllm.data.chat_batches import EpochStream, pair_batch, render_pair
from scratchllm.data.jsonl import read_preferences
from scratchllm.model.heads import ScalarModel, save_scalar_model
from scratchllm.model.io import load_model
from scratchllm.model.lora import has_lora, maybe_inject_lora, merge_lora
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.loop import Stage
from scratchllm.train.losses import bradley_terry_loss
from scratchllm.train.stages.runner import base_sections, run_stage, stage_main

# 25 steps of 32 pairs rank 92% of the held-out pairs in the default run (40 ranked 95%; docs/results.md).
DEFAULT_LOOP = LoopConfig(max_steps=25, batch_size=32, eval_every=0, checkpoint_every=25)
DEFAULT_OPTIM = OptimConfig(lr=3e-4, warmup_steps=10, weight_decay=0.0, min_lr_ratio=0.1)


def pair_rewards(model: ScalarModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    width = max(batch["chosen"].shape[1], batch["rejected"].shape[1])
    both = torch.cat([_pad_to(batch["chosen"], width), _pad_to(batch["rejected"], width)])
    lengths = torch.cat([batch["chosen_len"], batch["rejected_len"]])
    rewards = model(both, lengths)  # one forward for both sides
    n = batch["chosen"].shape[0]
    return rewards[:n], rewards[n:]


def _pad_to(ids: Tensor, width: int) -> Tensor:
    if ids.shape[1] >= width:
        return ids
    return torch.nn.functional.pad(ids, (0, width - ids.shape[1]))  # pads are never read: lengths mark the end


class RewardStage(Stage):
    name = "reward"

    def __init__(self, tok: Tokenizer, train_pairs: list, val_pairs: list, cfg: RewardConfig, loop: LoopConfig) -> None:
        self.tok, self.cfg, self.loop = tok, cfg, loop
        self.stream = EpochStream([render_pair(tok, p, 256) for p in train_pairs], loop.batch_size, loop.seed)
        self.val = [(render_pair(tok, p, 256), p.get("rule", "?")) for p in val_pairs]

    def batches(self, split: str) -> Iterator[dict[str, Tensor]]:
        for pairs in self.stream:
            yield pair_batch(pairs, self.tok.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        chosen, rejected = pair_rewards(model, batch)
        return bradley_terry_loss(chosen, rejected, self.cfg.margin)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        correct: dict[str, list[float]] = defaultdict(list)
        gaps = []
        for start in range(0, len(self.val), 64):
            chunk = self.val[start : start + 64]
            batch = {k: v.to(device) for k, v in pair_batch([p for p, _ in chunk], self.tok.pad_id).items()}
            chosen, rejected = pair_rewards(model, batch)
            for (_, rule), c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                correct[rule].append(float(c > r))
                gaps.append(c - r)
        everything = [x for v in correct.values() for x in v]
        out = {"rm_accuracy": sum(everything) / max(len(everything), 1), "reward_gap": sum(gaps) / max(len(gaps), 1)}
        out.update({f"rm_accuracy/{rule}": sum(v) / len(v) for rule, v in sorted(correct.items())})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.stream.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.position = state["position"]

    def tokens_in(self, batch: dict[str, Tensor]) -> int:
        return batch["chosen"].numel() + batch["rejected"].numel()

    def save_final(self, model: nn.Module, directory: Path, tokenizer: Tokenizer, sections: dict[str, Any]) -> None:
        if has_lora(model):  # no adapter-only copy: without the trained head it would not be a reward model
            merge_lora(model)
        save_scalar_model(directory, model, tokenizer, sections)


def run(run_root: Path, init: Path, data_dir: Path = Path("corpus/chat"), overrides: list[str] | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Train a reward model (trunk initialised from --init) on preference pairs."""
    defaults = base_sections(DEFAULT_LOOP, DEFAULT_OPTIM, reward=RewardConfig())
    return run_stage(run_root, "reward", defaults, overrides, resume, partial(build, init, Path(data_dir)))


def build(init: Path, data_dir: Path, sections: dict[str, Any]) -> tuple[nn.Module, RewardStage, Tokenizer]:
    """(model, stage, tokenizer): the --init trunk under a new scalar head, and the preference pairs."""
    train_pairs = read_preferences(Path(data_dir) / "prefs_train.jsonl")
    val_pairs = read_preferences(Path(data_dir) / "prefs_val.jsonl")
    trunk, tok, _ = load_model(init)
    sections["model"] = trunk.config
    model = ScalarModel(trunk).train()
    maybe_inject_lora(model.trunk, sections["lora"])  # the new `score` head always trains in full
    return model, RewardStage(tok, train_pairs, val_pairs, sections["reward"], sections["loop"]), tok


def main(argv: list[str]) -> int:
    return stage_main(argv, "reward", run)
