"""Language-model batches: random windows of seq_len + 1 tokens from a shard, addressed by global batch index.

Batch k is a pure function of (seed, k): resuming needs only the counter, and with N processes rank r
takes batches r, r+N, r+2N, … — the same stream one process would see with N× the accumulation.
Over several shards (a `ShardSet`), a window start is drawn uniformly among every start that keeps the
window inside one shard, so one shard draws exactly the windows a plain token array does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from scratchllm import runtime
from scratchllm.data.shards import ShardError, ShardSet


class LMWindows:
    """Batches of random windows from one token array or a `ShardSet` (read lazily, shard by shard)."""

    def __init__(self, tokens: np.ndarray | ShardSet, seq_len: int, batch_size: int, seed: int = 0) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.shards: ShardSet | list[np.ndarray] = tokens if isinstance(tokens, ShardSet) else [tokens]
        sizes = tokens.sizes if isinstance(tokens, ShardSet) else np.array([len(tokens)])
        # window starts each shard offers, then the first global start of every shard: [0, n_0, n_0 + n_1, …]
        self.first_start = np.concatenate([[0], np.cumsum(np.maximum(sizes - seq_len - 1, 0))])
        self.n_tokens = int(sizes.sum())
        if self.first_start[-1] <= 0:
            raise ShardError(f"the text has {sizes.max()} tokens, fewer than one window of --loop.seq_len + 1 = "
                             f"{seq_len + 1}: add text or lower --loop.seq_len")
        self.position = 0  # global batches consumed so far (the resumable state)

    def draws(self, index: int) -> list[tuple[int, int]]:
        """(shard, start) of every row of global batch `index`: a pure function of (seed, index)."""
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, self.first_start[-1], size=self.batch_size)
        shard = np.searchsorted(self.first_start, starts, side="right") - 1
        return [(int(i), int(s - self.first_start[i])) for i, s in zip(shard, starts)]

    def batch(self, index: int) -> dict[str, Tensor]:
        rows = [self.shards[i][s : s + self.seq_len + 1] for i, s in self.draws(index)]
        ids = torch.from_numpy(np.stack(rows).astype(np.int64))
        return {"ids": ids[:, :-1], "targets": ids[:, 1:]}

    def state_dict(self) -> dict[str, int]:
        """The position (with what it indexes, to catch a resume on other data); rank-independent by design."""
        return {"position": self.position, "n_shards": len(self.shards), "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        here = self.state_dict()
        for key in ("n_shards", "n_tokens"):
            if key in state and state[key] != here[key]:
                print(f"[resume] the checkpoint's data had {key}={state[key]}, this run's has {here[key]}: "
                      "the batches from here on differ from an uninterrupted run")
        self.position = state["position"]

    def indexed(self) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """(global batch index, batch) from the current position on; the index addresses a companion stream."""
        while True:
            index = self.position * runtime.world_size() + runtime.rank()
            self.position += 1
            yield index, self.batch(index)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return (batch for _, batch in self.indexed())


def sequential_windows(tokens: np.ndarray | ShardSet, seq_len: int, batch_size: int,
                       max_batches: int) -> Iterator[dict[str, Tensor]]:
    """Deterministic non-overlapping windows for validation: the same tokens every evaluation.

    Over a `ShardSet`, the windows of shard 0, then shard 1, …, none across a boundary; only the shards the
    first `batch_size * max_batches` windows need are mapped."""
    shards = (tokens[i] for i in range(len(tokens))) if isinstance(tokens, ShardSet) else iter([tokens])
    windows = (shard[i * seq_len : i * seq_len + seq_len + 1] for shard in shards for i in range((len(shard) - 1) // seq_len))
    windows = itertools.islice(windows, batch_size * max_batches)
    while rows := list(itertools.islice(windows, batch_size)):
        ids = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield {"ids": ids[:, :-1], "targets": ids[:, 1:]}
