"""Language-model batches: random windows of seq_len + 1 tokens from a shard, addressed by global batch index.

Batch k is a pure function of (seed, k): resuming needs only the counter, and with N processes rank r
takes batches r, r+N, r+2N, … — the same stream one process would see with N× the accumulation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


class LMWindows:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0) -> None:
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"shard has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.position = 0  # global batches consumed so far (the resumable state)

    def batch(self, index: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        window = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        ids = torch.from_numpy(window)
        return {"ids": ids[:, :-1], "targets": ids[:, 1:]}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        from scratchllm.train import distributed as dist

        while True:
            index = self.position * dist.world_size() + dist.rank()
            self.position += 1
            yield self.batch(index)


def sequential_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int) -> Iterator[dict[str, Tensor]]:
    """Deterministic non-overlapping windows for validation: the same tokens every evaluation."""
    n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    for first in range(0, n_windows, batch_size):
        rows = [tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(first, min(first + batch_size, n_windows))]
        ids = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield {"ids": ids[:, :-1], "targets": ids[:, 1:]}
