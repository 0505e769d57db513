"""Pretraining: next-token cross-entropy on the bundled text; headline metric = held-out bits-per-byte.

Data: corpus/pretrain/{train,val}/*.txt -> token shards (built once per tokenizer) -> random windows.
With --data.shard_tokens=N the text is streamed into several shards of at most N tokens, read lazily.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from scratchllm.config import ConfigError, DataConfig, LoopConfig, OptimConfig, TokenizerConfig, model_preset
from scratchllm.data.batches import LMWindows, sequential_windows
from scratchllm.data.chat_batches import chat_token_stream
from scratchllm.data.jsonl import read_conversations, read_tasks, resolve_record_file
from scratchllm.data.shards import ShardError, ShardSet, build_shard, build_shards, load_shard
from scratchllm.data.sources import data_fingerprint, iter_rows, split_files, text_prefix
from scratchllm.eval.chat_eval import task_pass_at_1
from scratchllm.eval.metrics import copy_accuracy, evaluate_lm, token_byte_lengths
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.loop import Stage
from scratchllm.train.losses import masked_lm_loss
from scratchllm.train.stages.runner import base_sections, resolve_sections, run_stage, stage_main

# The default run's pretraining: a fixed number of steps, the same model on every machine (docs/results.md).
# Evaluated before and after only (8 batches of 16 x 256 held-out tokens): the loss curve shows the way between.
DEFAULT_LOOP = LoopConfig(max_steps=300, batch_size=16, seq_len=256, eval_every=0, eval_batches=8,
                          checkpoint_every=150)
# Muon for the blocks' matrices (train/optim.py): an update that moves every direction of a matrix alike learns the
# rare features (which token of the prompt to read) that AdamW's update leaves behind at this step count, and
# lowers the text's bits-per-byte faster too (docs/results.md).
DEFAULT_OPTIM = OptimConfig(lr=3e-3, warmup_steps=30, weight_decay=0.1, min_lr_ratio=0.1, muon_lr=0.02)


class PretrainStage(Stage):
    name = "pretrain"
    supports_fsdp = True  # every step calls the whole model (--loop.parallel=fsdp)

    def __init__(self, train_tokens, val_tokens, tokenizer: Tokenizer, loop: LoopConfig,
                 chat_tokens: np.ndarray | None = None, chat_rows: int = 0,
                 val_tasks: list[dict[str, Any]] | None = None, chat_mask: np.ndarray | None = None) -> None:
        chat_rows = chat_rows if chat_tokens is not None else 0
        if chat_rows >= loop.batch_size:
            raise ConfigError(f"--data.chat_rows={chat_rows} must be below --loop.batch_size={loop.batch_size}: "
                              "every batch keeps some text rows")
        self.windows = LMWindows(train_tokens, loop.seq_len, loop.batch_size - chat_rows, seed=loop.seed)
        # The chat rows of batch k are a pure function of (seed, k), like the text rows: resume stays exact.
        self.chat_windows = LMWindows(chat_tokens, loop.seq_len, chat_rows, seed=loop.seed + 1) if chat_rows else None
        # Same length, seed and shape as chat_windows, so it draws the same windows: the loss mask of each chat row.
        self.chat_masks = (LMWindows(chat_mask, loop.seq_len, chat_rows, seed=loop.seed + 1)
                           if chat_rows and chat_mask is not None else None)
        self.val_tokens, self.loop, self.tok, self.val_tasks = val_tokens, loop, tokenizer, val_tasks or []
        self.token_bytes = token_byte_lengths(tokenizer, tokenizer.vocab_size)
        self.n_regular_tokens = min(tokenizer.special_by_id, default=tokenizer.vocab_size)  # specials come last

    def batches(self, split: str) -> Iterator[dict[str, Tensor]]:
        if self.chat_windows is None:
            return iter(self.windows)
        return self._mixed_batches()

    def _mixed_batches(self) -> Iterator[dict[str, Tensor]]:
        for index, text in self.windows.indexed():
            chat = self.chat_windows.batch(index)
            batch = {key: torch.cat([text[key], chat[key]]) for key in ("ids", "targets")}
            if self.chat_masks is not None:  # text rows count every token, chat rows their replies only
                reply = self.chat_masks.batch(index)["targets"].bool()
                batch["mask"] = torch.cat([torch.ones_like(text["targets"], dtype=torch.bool), reply])
            yield batch

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return masked_lm_loss(model, batch["ids"], batch["targets"], batch.get("mask")), {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        batches = sequential_windows(self.val_tokens, self.loop.seq_len, self.loop.batch_size, self.loop.eval_batches)
        # copy_accuracy: induction heads forming show up here as a jump (Olsson et al. 2022); 0 on a 5-minute CPU run
        metrics = {**evaluate_lm(model, batches, self.token_bytes), "copy_accuracy": copy_accuracy(model, self.n_regular_tokens)}
        if self.val_tasks:  # with task-format rows in the batches, whether the model reads the questions yet
            metrics.update(task_pass_at_1(model, self.tok, self.val_tasks))
        return metrics

    def tokens_in(self, batch: dict[str, Tensor]) -> int:
        return batch["ids"].numel()

    def state_dict(self) -> dict[str, Any]:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state)


def shard_for(split_dir: Path, tokenizer: Tokenizer, cache_dir: Path):
    """Build (or reuse, if made with this tokenizer from these very files) the shard for one split.

    `split_dir` is a folder of .txt/.jsonl/.parquet files or, failing that, one file `<split_dir>.<suffix>`.
    The cache is keyed on the files' bytes too: new data under the same names rebuilds it."""
    files = split_files(split_dir)
    data = data_fingerprint(files)
    path = cache_dir / f"{split_dir.name}.bin"
    if path.exists():
        try:
            tokens, header = load_shard(path, tokenizer)
            if header.get("data") == data:
                return tokens
            print(f"[pretrain] rebuilding {path}: the data files changed since it was built")
        except ShardError as err:
            print(f"[pretrain] rebuilding stale shard: {err}")
    build_shard(files, tokenizer, path, num_workers=2, data=data)
    return load_shard(path, tokenizer)[0]


def shard_set_for(split_dir: Path, tokenizer: Tokenizer, cache_dir: Path, shard_tokens: int) -> ShardSet:
    """Build (or reuse) the shards of one split, at most `shard_tokens` tokens each, streamed from the data files.

    `manifest.json`, written last, marks a finished build: a build that was killed halfway is redone. It records
    the tokenizer and the data fingerprint, so other data or another tokenizer rebuilds the shards."""
    files = split_files(split_dir)
    data = data_fingerprint(files)
    out = cache_dir / f"{split_dir.name}-{shard_tokens}"
    manifest = out / "manifest.json"
    if manifest.exists():
        try:
            listed = json.loads(manifest.read_text())
            if listed.get("tokenizer") == tokenizer.fingerprint() and listed.get("data") == data:
                return ShardSet([out / name for name in listed["shards"]], tokenizer)
            print(f"[pretrain] rebuilding {out}: built from other data files or another tokenizer")
        except (ShardError, OSError, ValueError) as err:
            print(f"[pretrain] rebuilding stale shards: {err}")
    # subtle: stale shards are overwritten, never deleted first, so torchrun ranks building the same directory at
    # once only ever replace a file by identical bytes; shards past the manifest's list are ignored
    paths = build_shards(files, tokenizer, out, shard_tokens, prefix=split_dir.name, num_workers=2, data=data)
    tmp = manifest.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"tokenizer": tokenizer.fingerprint(), "data": data, "shards": [p.name for p in paths]}))
    tmp.replace(manifest)
    return ShardSet(paths, tokenizer)


def chat_pretraining_tokens(files: str, tok: Tokenizer, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`--data.chat_data` (comma-separated .jsonl / .parquet files) as one token stream: a file whose first record
    has an `answer` holds verifiable tasks (each becomes its question and canonical reply), any other conversations."""
    from scratchllm.data.tasks import task_conversation

    conversations: list[dict[str, Any]] = []
    for name in filter(None, (f.strip() for f in files.split(","))):
        path = resolve_record_file(name)  # names the file and the fix when it is missing
        first = next((record for _, record, _ in iter_rows(path) if record is not None), {})
        if "answer" in first:
            conversations += [task_conversation(t) for t in read_tasks(path)]
        else:
            conversations += read_conversations(path)
    return chat_token_stream(tok, conversations, seed)  # (ids, reply mask)


def run(
    run_root: Path,
    init: Path | None = None,
    preset: str = "mini",
    tokenizer: Path | None = None,
    data_dir: Path = Path("corpus/pretrain"),
    overrides: list[str] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Pretrain a GPT from scratch (or continue from --init) on text files."""
    started = time.perf_counter()
    # the overrides are checked before the tokenizer is trained (a minute), then again with its vocabulary
    resolve_sections(base_sections(DEFAULT_LOOP, DEFAULT_OPTIM, model=model_preset(preset), data=DataConfig()),
                     overrides)
    if tokenizer is None:
        from scratchllm.tokenizer.cli import train_tokenizer_from_files

        tokenizer = Path(run_root) / "tokenizer" / "tokenizer.json"
        train_tokenizer_from_files(split_files(data_dir / "train"), TokenizerConfig().vocab_size, tokenizer,
                                   read_prefix=text_prefix)  # .txt, .jsonl or .parquet alike
    tok = Tokenizer.load(tokenizer)
    defaults = base_sections(DEFAULT_LOOP, DEFAULT_OPTIM, model=model_preset(preset, vocab_size=tok.vocab_size),
                             data=DataConfig())
    return run_stage(run_root, "pretrain", defaults, overrides, resume,
                     partial(build, Path(run_root) / "pretrain", init, tok, data_dir), started=started)


def build(stage_dir: Path, init: Path | None, tok: Tokenizer, data_dir: Path, sections: dict[str, Any],
          ) -> tuple[nn.Module, PretrainStage, Tokenizer]:
    """(model, stage, tokenizer): a fresh model of the preset (or --init's), and token shards of the text."""
    if init is not None:
        from scratchllm.model.io import load_model

        model, tok, _ = load_model(init)
        sections["model"] = model.config
    else:
        model = GPT(sections["model"])
    loop = sections["loop"]
    if loop.seq_len > sections["model"].max_seq_len:
        raise ConfigError(f"--loop.seq_len={loop.seq_len} exceeds --model.max_seq_len={sections['model'].max_seq_len}")
    cache, shard_tokens = stage_dir / "shards", sections["data"].shard_tokens
    if shard_tokens:
        train_tokens = shard_set_for(data_dir / "train", tok, cache, shard_tokens)
        val_tokens = shard_set_for(data_dir / "val", tok, cache, shard_tokens)
    else:
        train_tokens, val_tokens = shard_for(data_dir / "train", tok, cache), shard_for(data_dir / "val", tok, cache)
    data = sections["data"]
    chat_tokens = chat_mask = None
    if data.chat_data and data.chat_rows:
        chat_tokens, chat_mask = chat_pretraining_tokens(data.chat_data, tok, loop.seed)
    val_tasks = read_tasks(Path(data.eval_tasks)) if data.eval_tasks else None
    stage = PretrainStage(train_tokens, val_tokens, tok, loop, chat_tokens, data.chat_rows, val_tasks,
                          chat_mask if data.chat_loss == "replies" else None)
    print(f"[pretrain] {model.num_params() / 1e6:.2f}M parameters, {stage.windows.n_tokens / 1e6:.2f}M train tokens"
          + (f" in {len(train_tokens)} shards" if shard_tokens else "")
          + (f" + {len(chat_tokens) / 1e6:.2f}M chat-format tokens in {data.chat_rows} of {loop.batch_size} rows"
             if chat_tokens is not None else ""))
    return model, stage, tok


def _args(parser) -> None:
    parser.add_argument("--init", type=Path, default=None,
                        help="model directory to continue pretraining (default: a fresh model of --preset)")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: train one)")


def main(argv: list[str]) -> int:
    return stage_main(argv, "pretrain", run, needs_init=False, extra_args=_args)
