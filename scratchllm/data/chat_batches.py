"""Batches for post-training: masked SFT sequences and (chosen, rejected) pairs, right-padded.

Shuffling is a pure function of (seed, epoch), and batch k of the stream is found from k alone, so a
resumed run continues with exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from scratchllm import runtime
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.chat import render_conversation, render_for_completion


def length_sorted_chunks(lengths: list[int], size: int) -> list[list[int]]:
    """Row indices in chunks of `size`, shortest rows first (stable): each chunk pads only to its own longest row.
    Evaluation uses it wherever the order of rows does not change the result."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start : start + size] for start in range(0, len(order), size)]


def pad_right(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def render_sft_counted(tok: Tokenizer, conversations: list[dict[str, Any]],
                       max_len: int) -> tuple[list[tuple[list[int], list[bool]]], int]:
    """(ids, loss mask) per conversation cut to `max_len`, and how many were dropped because the cut left no
    assistant token to train (the reply started past `max_len`)."""
    out = []
    for conv in conversations:
        ids, mask = render_conversation(tok, conv["messages"], max_len=max_len)
        if any(mask[1:]):  # something left to train after truncation
            out.append((ids, mask))
    return out, len(conversations) - len(out)


def render_sft(tok: Tokenizer, conversations: list[dict[str, Any]], max_len: int,
               label: str | None = None) -> list[tuple[list[int], list[bool]]]:
    """render_sft_counted's rows; with a `label`, a drop is printed rather than silent (issue 31)."""
    rows, n_dropped = render_sft_counted(tok, conversations, max_len)
    if label is not None and n_dropped:
        print(f"[{label}] dropped {n_dropped:,} of {len(conversations):,} conversations: no assistant token is left "
              f"within max_len={max_len} tokens (raise --sft.max_len to keep them)")
    return rows


def chat_token_stream(tok: Tokenizer, conversations: list[dict[str, Any]], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every conversation rendered with the chat template, in a seeded order, end to end: one token array that
    pretraining draws windows from (`LMWindows`), so the template and the task questions are language the model
    learns from its first step, not a format it first meets in SFT. Also the loss mask over the same positions
    (True on assistant replies and their <|im_end|>), for `--data.chat_loss=replies`."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    mask: list[bool] = []
    for i in order:
        row_ids, row_mask = render_conversation(tok, conversations[i]["messages"])
        ids += row_ids
        mask += row_mask
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.bool_)


def sft_batch(examples: list[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, Tensor]:
    """ids (B, T-1) -> targets (B, T-1) with the loss mask aligned to the targets."""
    ids = pad_right([e[0] for e in examples], pad_id)
    mask = pad_right([[int(m) for m in e[1]] for e in examples], 0).bool()
    return {"ids": ids[:, :-1], "targets": ids[:, 1:], "mask": mask[:, 1:]}


def render_pair(tok: Tokenizer, record: dict[str, Any], max_len: int) -> dict[str, Any]:
    """prompt + reply token ids and response masks for both replies of a preference pair.

    A `rejected_truncated` reply (rule no_end) is rendered without its closing <|im_end|>.
    """
    prompt = render_for_completion(tok, record["prompt"])
    out: dict[str, Any] = {}
    for side in ("chosen", "rejected"):
        reply = tok.encode(record[side])
        if not (side == "rejected" and record.get("rejected_truncated")):
            reply = reply + [tok.im_end_id]
        ids = (prompt + reply)[:max_len]
        out[side] = ids
        out[f"{side}_mask"] = ([False] * len(prompt) + [True] * len(reply))[:max_len]
    return out


def pair_batch(pairs: list[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    batch: dict[str, Tensor] = {}
    for side in ("chosen", "rejected"):
        batch[side] = pad_right([p[side] for p in pairs], pad_id)
        batch[f"{side}_mask"] = pad_right([[int(m) for m in p[f"{side}_mask"]] for p in pairs], 0).bool()
        batch[f"{side}_len"] = torch.tensor([len(p[side]) for p in pairs])
    return batch


class EpochStream:
    """Batch k of an endless, epoch-shuffled stream over `items`; `position` is the resumable state."""

    def __init__(self, items: list[Any], batch_size: int, seed: int) -> None:
        if not items:
            raise ValueError("no training examples")
        self.items, self.batch_size, self.seed = items, min(batch_size, len(items)), seed
        self.per_epoch = len(items) // self.batch_size
        self.position = 0

    def batch_items(self, k: int) -> list[Any]:
        epoch, index = divmod(k, self.per_epoch)
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        return [self.items[i] for i in chosen]

    def __iter__(self) -> Iterator[list[Any]]:
        while True:
            k = self.position * runtime.world_size() + runtime.rank()
            self.position += 1
            yield self.batch_items(k)
