"""Preallocated key/value caches for incremental decoding: prefill writes T positions, each decode step one.

`KVCache` (engine.py, GPT.forward): all rows share one write index (`length`): prompts of different lengths are
left-padded by the engine and the padding is hidden by the attention mask, so positions stay per-row while the
cache stays one tensor. `SlotKVCache` (continuous batching): one slot per row, each with its own length, written
at per-row positions with one `index_copy_` per layer, so rows join and leave without touching the others.
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


class SlotKVCache:
    """K/V for `n_slots` rows: per layer one flat (2*S*K*T, D) tensor, read as keys and values of shape (S, K, T, D);
    a row's positions 0..length-1 live in its slot.

    Static shape: allocated once, never concatenated or resized. (S, K, T) are laid out so that the keys of slots
    0..n-1 are a (n*K, length, D) view for batched matmuls, and one new position of one (row, head) is one row of the
    flat tensor, so a layer's new keys and values go in with one `index_copy_` (`write_index` says where). The whole
    tensor is written in place, not a view of it, so torch.compile updates it in place instead of copying it."""

    def __init__(self, config: ModelConfig, n_slots: int, max_len: int, n_kv_heads: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.shape = (n_slots, n_kv_heads, max_len, config.d_head)  # (S, K, T, D)
        rows = 2 * n_slots * n_kv_heads * max_len
        self.kv = [torch.zeros(rows, config.d_head, device=device, dtype=dtype) for _ in range(config.n_layers)]

    def write_index(self, slots: Tensor, positions: Tensor) -> Tensor:
        """slots (B,), positions (B, T) -> (B*T*2K,) rows of the flat tensor, in the order of a (B, T, 2K, D)
        tensor's rows: K key heads, then K value heads.

        Worked example: S=4, K=2, T_max=8, slot 1 position 3 -> keys at rows (1*2+0)*8+3 = 19 and 27, values at
        ((4+1)*2+0)*8+3 = 83 and 91 (the values start at S*K*T_max = 64)."""
        S, K, T_max, _ = self.shape
        head = torch.arange(2 * K, device=slots.device)
        plane = (head // K) * S  # 0 for keys, S for values
        return (((plane + slots[:, None, None]) * K + head % K) * T_max + positions[:, :, None]).flatten()

    def write(self, layer: int, index: Tensor, kv: Tensor) -> None:
        """kv (B, T, 2K, D): keys then values, at the rows `write_index` gave."""
        flat = self.kv[layer]
        flat.index_copy_(0, index, kv.reshape(-1, flat.shape[1]).to(flat.dtype))

    def keys(self, layer: int) -> Tensor:
        """(S, K, T, D), a view."""
        return self.kv[layer].view(2, *self.shape)[0]

    def values(self, layer: int) -> Tensor:
        return self.kv[layer].view(2, *self.shape)[1]

    def move(self, src: int, dst: int, length: int) -> None:
        for flat in self.kv:
            view = flat.view(2, *self.shape)
            view[:, dst, :, :length] = view[:, src, :, :length]

    def swap(self, a: int, b: int, length: int) -> None:
        pair, flipped = [a, b], [b, a]
        for flat in self.kv:
            view = flat.view(2, *self.shape)
            view[:, pair, :, :length] = view[:, flipped, :, :length]  # the right side is a copy: a safe swap
