"""Preallocated key/value cache for incremental decoding: prefill writes T positions, each decode step one.

All rows share one write index (`length`): prompts of different lengths are left-padded by the engine and
the padding is hidden by the attention mask, so positions stay per-row while the cache stays one tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scratchllm.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        n_kv_heads: int | None = None,
    ) -> None:
        """`n_kv_heads`: the K/V heads each attention holds on this process, when that is not all of
        `config.n_kv_heads` (tensor parallelism splits them across processes)."""
        self.max_len = max_len or config.max_seq_len
        heads = n_kv_heads or config.n_kv_heads
        shape = (config.n_layers, batch_size, heads, self.max_len, config.d_head)  # (L, B, K, T, D)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already written (same for every row)

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys/values for `layer`; return everything cached so far, (B, K, length+T, D)."""
        T = k_new.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated "
                             "(raise --model.max_seq_len or shorten the prompt / max_new_tokens)")
        self.k[layer, :, :, self.length : end] = k_new.to(self.k.dtype)
        self.v[layer, :, :, self.length : end] = v_new.to(self.v.dtype)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Called once per forward, after every layer has written its `n_tokens` new positions."""
        self.length += n_tokens

    def reorder(self, rows: Tensor) -> None:
        """Keep only `rows` of the batch (e.g. drop finished sequences)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
