"""Supervised fine-tuning: cross-entropy on assistant tokens only (the chat template's loss mask).

Headline metrics on held-out data: assistant-token loss, end-of-reply rate (does the model stop?) and
verifiable-task pass@1, plus bits-per-byte on held-out pretraining text to show what SFT costs the base
model. Data: corpus/chat/sft_{train,val}.jsonl, tasks_val.jsonl, and `sft.pretrain_rows` windows of
pretraining text per step (replay, as InstructGPT's "PPO-ptx" mixes pretraining gradients; Ouyang et al. 2022).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from scratchllm.config import LoopConfig, OptimConfig, SFTConfig
from scratchllm.data.batches import LMWindows, sequential_windows
from scratchllm.data.chat_batches import EpochStream, render_sft, sft_batch
from scratchllm.data.jsonl import read_conversations, read_tasks
from scratchllm.data.sources import DataFormatError, split_files
from scratchllm.data.tasks import task_conversation
from scratchllm.eval.chat_eval import end_of_reply_rate, task_pass_at_1
from scratchllm.eval.metrics import evaluate_lm, token_byte_lengths
from scratchllm.model.io import load_model
from scratchllm.model.lora import maybe_inject_lora
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.loop import Stage
from scratchllm.train.losses import cross_entropy_loss, masked_lm_loss
from scratchllm.train.stages.pretrain import shard_for
from scratchllm.train.stages.runner import base_sections, run_stage, stage_main

# 50 steps: pretraining's task rows already taught the reply format, SFT adds the chat conversations (docs/results.md)
DEFAULT_LOOP = LoopConfig(max_steps=50, batch_size=32, eval_every=0, eval_batches=8, checkpoint_every=25)
DEFAULT_OPTIM = OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0, min_lr_ratio=0.1)


class SFTStage(Stage):
    name = "sft"
    supports_fsdp = True  # every step calls the whole model; evaluation generates the same replies on every rank

    def __init__(self, tok: Tokenizer, train_convs: list, val_convs: list, val_tasks: list, cfg: SFTConfig, loop: LoopConfig,
                 text_tokens: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.tok, self.cfg, self.loop = tok, cfg, loop
        self.stream = EpochStream(render_sft(tok, train_convs, cfg.max_len, label="sft train"), loop.batch_size, loop.seed)
        # Shortest first: batches of similar length pad little (val_loss is a mean over tokens, order-free).
        self.val_examples = sorted(render_sft(tok, val_convs, cfg.max_len, label="sft val"), key=lambda e: len(e[0]))
        self.val_convs, self.val_tasks = val_convs[: cfg.eval_prompts], val_tasks
        self.text_windows = self.val_text = None
        if text_tokens is not None:  # (train, val) pretraining tokens
            if cfg.pretrain_rows > 0:
                self.text_windows = LMWindows(text_tokens[0], cfg.pretrain_seq_len, cfg.pretrain_rows, seed=loop.seed)
            self.val_text, self.token_bytes = text_tokens[1], token_byte_lengths(tok, tok.vocab_size)

    def batches(self, split: str) -> Iterator[dict[str, Tensor]]:
        for examples in self.stream:
            batch = sft_batch(examples, self.tok.pad_id)
            if self.text_windows is not None:  # window k is a pure function of k: resume stays exact
                text = self.text_windows.batch(self.stream.position)
                batch |= {"text_ids": text["ids"], "text_targets": text["targets"]}
            yield batch

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        loss = masked_lm_loss(model, batch["ids"], batch["targets"], batch["mask"])
        if "text_ids" not in batch:
            return loss, {}
        text_loss = cross_entropy_loss(model(batch["text_ids"]), batch["text_targets"])
        return loss + self.cfg.pretrain_weight * text_loss, {"chat_loss": float(loss.detach()), "text_loss": float(text_loss.detach())}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(self.val_examples), self.loop.batch_size):
            batch = sft_batch(self.val_examples[start : start + self.loop.batch_size], self.tok.pad_id)
            n = int(batch["mask"].sum())
            total += float(masked_lm_loss(model, batch["ids"].to(device), batch["targets"].to(device), batch["mask"].to(device))) * n
            count += n
        metrics = {"val_loss": total / max(count, 1)}
        if self.val_text is not None:  # the same windows pretraining evaluates on: forgetting shows here
            windows = sequential_windows(self.val_text, min(256, self.cfg.max_len), 16, 4)
            metrics["val_bpb"] = evaluate_lm(model, windows, self.token_bytes)["val_bpb"]
        metrics["end_rate"] = end_of_reply_rate(model, self.tok, self.val_convs)
        metrics.update(task_pass_at_1(model, self.tok, self.val_tasks))
        return metrics

    def tokens_in(self, batch: dict[str, Tensor]) -> int:
        return batch["ids"].numel()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.stream.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.position = state["position"]


def pretraining_tokens(text_dir: Path, tok: Tokenizer, run_root: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(train, val) tokens of the pretraining text, reusing pretrain's shards when the tokenizer matches."""
    try:  # a split is a folder (train/) or one file (train.txt / .jsonl / .parquet), as pretraining reads it
        for split in ("train", "val"):
            split_files(text_dir / split)
    except DataFormatError:
        print(f"[sft] no pretraining text under {text_dir}: no replay, no val_bpb (--sft.pretrain_data)")
        return None
    cache = run_root / "pretrain" / "shards"
    return shard_for(text_dir / "train", tok, cache), shard_for(text_dir / "val", tok, cache)


def run(run_root: Path, init: Path, data_dir: Path = Path("corpus/chat"), overrides: list[str] | None = None,
        resume: bool = False) -> dict[str, Any]:
    """Fine-tune a pretrained model on chat conversations (loss on assistant tokens only)."""
    defaults = base_sections(DEFAULT_LOOP, DEFAULT_OPTIM, sft=SFTConfig())
    return run_stage(run_root, "sft", defaults, overrides, resume, partial(build, run_root, init, Path(data_dir)))


def build(run_root: Path, init: Path, data_dir: Path, sections: dict[str, Any]) -> tuple[nn.Module, SFTStage, Tokenizer]:
    """(model, stage, tokenizer): the --init model, with LoRA adapters if asked, and its chat data."""
    if sections["sft"].train_data == "tasks":  # validated before any compute
        train_convs = [task_conversation(t) for t in read_tasks(data_dir / "tasks_train.jsonl")]
    else:
        train_convs = read_conversations(data_dir / "sft_train.jsonl")
    val_convs = read_conversations(data_dir / "sft_val.jsonl")
    val_tasks = read_tasks(data_dir / "tasks_val.jsonl")[: sections["sft"].eval_tasks]
    model, tok, _ = load_model(init)
    sections["model"] = model.config
    maybe_inject_lora(model, sections["lora"])
    stage = SFTStage(tok, train_convs, val_convs, val_tasks, sections["sft"], sections["loop"],
                     pretraining_tokens(Path(sections["sft"].pretrain_data), tok, Path(run_root)))
    torch.manual_seed(sections["loop"].seed)
    return model, stage, tok


def main(argv: list[str]) -> int:
    return stage_main(argv, "sft", run)
