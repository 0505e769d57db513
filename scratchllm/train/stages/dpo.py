"""Direct preference optimisation against a frozen reference (the SFT model), on the same preference pairs,
with an SFT term on the chosen replies (RPO, `--dpo.sft_weight`; 0 = plain DPO).

Headline metrics on held-out pairs: preference accuracy under the implicit reward β·(log π - log π_ref),
chosen/rejected margins, plus end-of-reply rate and task pass@1 so DPO sits in the same report columns.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm.config import DPOConfig, LoopConfig, OptimConfig
from scratchllm.data.chat_batches import EpochStream, pair_batch, render_pair
from scratchllm.data.jsonl import read_conversations, read_preferences, read_tasks
from scratchllm.eval.chat_eval import end_of_reply_rate, task_pass_at_1
from scratchllm.model.io import load_model
from scratchllm.model.logprobs import sequence_logprobs
from scratchllm.model.lora import maybe_inject_lora
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.loop import Stage
from scratchllm.train.losses import dpo_loss
from scratchllm.train.stages.runner import base_sections, run_stage, stage_main

DEFAULT_LOOP = LoopConfig(max_steps=40, batch_size=16, eval_every=0, checkpoint_every=20)
DEFAULT_OPTIM = OptimConfig(lr=1e-4, warmup_steps=5, weight_decay=0.0, min_lr_ratio=0.1)


class DPOStage(Stage):
    name = "dpo"
    supports_fsdp = True  # every step calls the whole model; evaluation generates the same replies on every rank

    def __init__(self, tok: Tokenizer, reference: nn.Module, train_pairs: list, val_pairs: list, val_convs: list,
                 val_tasks: list, cfg: DPOConfig, loop: LoopConfig) -> None:
        self.tok, self.reference, self.cfg = tok, reference.eval().requires_grad_(False), cfg
        self.stream = EpochStream([render_pair(tok, p, 256) for p in train_pairs], loop.batch_size, loop.seed)
        # Held-out pairs shortest first (batches of similar length pad little); the frozen reference's log-probs
        # of them are computed once, at the first evaluation.
        self.val = sorted((render_pair(tok, p, 256) for p in val_pairs), key=lambda r: len(r["chosen"]) + len(r["rejected"]))
        self._val_reference: list[tuple[Tensor, Tensor]] | None = None
        self.val_convs, self.val_tasks = val_convs, val_tasks

    def batches(self, split: str) -> Iterator[dict[str, Tensor]]:
        for pairs in self.stream:
            yield pair_batch(pairs, self.tok.pad_id)

    def _logps(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return (sequence_logprobs(model, batch["chosen"], batch["chosen_mask"]),
                sequence_logprobs(model, batch["rejected"], batch["rejected_mask"]))

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        self.reference.to(batch["chosen"].device)
        with torch.no_grad():
            ref_chosen, ref_rejected = self._logps(self.reference, batch)
        return self._objective(model, batch, ref_chosen, ref_rejected)

    def _objective(self, model: nn.Module, batch: dict[str, Tensor], ref_chosen: Tensor, ref_rejected: Tensor,
                   ) -> tuple[Tensor, dict[str, float]]:
        chosen, rejected = self._logps(model, batch)
        loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.cfg.beta)
        if self.cfg.sft_weight > 0:  # RPO: + α · NLL per token of the chosen reply
            chosen_nll = (-chosen / batch["chosen_mask"].sum(1).clamp(min=1)).mean()
            loss = loss + self.cfg.sft_weight * chosen_nll
            stats["chosen_nll"] = float(chosen_nll.detach())
        return loss, stats

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        self.reference.to(device)
        batches = [{k: v.to(device) for k, v in pair_batch(self.val[start : start + 64], self.tok.pad_id).items()}
                   for start in range(0, len(self.val), 64)]
        if self._val_reference is None:
            self._val_reference = [self._logps(self.reference, batch) for batch in batches]
        sums: dict[str, float] = {}
        for batch, (ref_chosen, ref_rejected) in zip(batches, self._val_reference):
            _, stats = self._objective(model, batch, ref_chosen, ref_rejected)
            for key, value in stats.items():  # batch means, weighted by rows: a mean over held-out pairs
                sums[key] = sums.get(key, 0.0) + value * len(batch["chosen"])
        metrics = {f"dpo_{k}": v / max(len(self.val), 1) for k, v in sums.items()}
        metrics["end_rate"] = end_of_reply_rate(model, self.tok, self.val_convs)
        metrics.update(task_pass_at_1(model, self.tok, self.val_tasks))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.stream.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.position = state["position"]

    def tokens_in(self, batch: dict[str, Tensor]) -> int:
        return batch["chosen"].numel() + batch["rejected"].numel()


def run(run_root: Path, init: Path, data_dir: Path = Path("corpus/chat"), overrides: list[str] | None = None,
        resume: bool = False) -> dict[str, Any]:
    """DPO from an SFT model (also the frozen reference) on preference pairs."""
    defaults = base_sections(DEFAULT_LOOP, DEFAULT_OPTIM, dpo=DPOConfig())
    return run_stage(run_root, "dpo", defaults, overrides, resume, partial(build, init, Path(data_dir)))


def build(init: Path, data_dir: Path, sections: dict[str, Any]) -> tuple[nn.Module, DPOStage, Tokenizer]:
    """(model, stage, tokenizer): the --init policy (LoRA if asked), a frozen copy as reference, the pairs."""
    cfg = sections["dpo"]
    train_pairs = read_preferences(data_dir / "prefs_train.jsonl")
    val_pairs = read_preferences(data_dir / "prefs_val.jsonl")[: cfg.eval_pairs]
    val_convs = read_conversations(data_dir / "sft_val.jsonl")[: cfg.eval_prompts]
    val_tasks = read_tasks(data_dir / "tasks_val.jsonl")[: cfg.eval_tasks]
    model, tok, _ = load_model(init)
    sections["model"] = model.config
    reference = copy.deepcopy(model)
    maybe_inject_lora(model, sections["lora"])
    stage = DPOStage(tok, reference, train_pairs, val_pairs, val_convs, val_tasks, sections["dpo"], sections["loop"])
    return model.train(), stage, tok


def main(argv: list[str]) -> int:
    return stage_main(argv, "dpo", run)
