"""The GPT: token ids -> embed_tokens -> N pre-norm blocks -> norm -> lm_head -> logits.

A Llama-family decoder (RMSNorm, RoPE, SwiGLU, GQA) whose parameter names match Hugging Face's
`LlamaForCausalLM` minus its `model.` prefix; a test holds our logits equal to theirs on shared weights.
Initialisation follows GPT-2 (Radford et al. 2019): N(0, 0.02), residual projections scaled by 1/√(2·L).
Activation checkpointing (Chen et al. 2016, arXiv:1604.06174) recomputes each block in the backward pass.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scratchllm.config import ModelConfig
from scratchllm.model.kv_cache import KVCache
from scratchllm.model.layers import Block, RMSNorm, RotaryEmbedding


class GPT(nn.Module):
    # True: training forwards keep only each block's input and recompute the block during backward
    # (--loop.activation_checkpointing, set by the training loop); not part of the config or the checkpoint.
    activation_checkpointing: bool = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.d_head, config.max_seq_len, config.rope_theta)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.apply(self._init_weights)
        residual_std = config.init_std / math.sqrt(2 * config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def _attention_mask(
        self, T: int, past: int, attention_mask: Tensor | None, device: torch.device
    ) -> Tensor | None:
        """Boolean (B|1, 1, T, past+T) mask, True = may attend; None means plain causal (SDPA fast path)."""
        window = self.config.sliding_window
        if attention_mask is None and past == 0 and not window:
            return None
        q_idx = torch.arange(past, past + T, device=device)[:, None]
        k_idx = torch.arange(past + T, device=device)[None, :]
        mask = k_idx <= q_idx  # (T, past+T) causal in cache coordinates
        if window:
            mask = mask & (q_idx - k_idx < window)
        mask = mask[None, None]  # (1, 1, T, past+T)
        if attention_mask is not None:
            # subtle: a padding query would see no key at all (NaN softmax); let it see itself instead.
            keys_ok = attention_mask[:, None, None, : past + T].bool()
            mask = (mask & keys_ok) | (q_idx == k_idx)[None, None]
        return mask

    def forward_hidden(
        self,
        ids: Tensor,
        kv_cache: KVCache | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """ids (B, T) -> final-normed hidden states (B, T, d_model).

        attention_mask (B, past+T), True = real token, covers the cached positions too (left padding).
        """
        B, T = ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            # Positions never exceed past+T-1 (left padding only lowers them), so the bounds check runs on Python
            # ints: no device sync per forward or decode step, no torch.compile graph break.
            if past + T > self.config.max_seq_len:
                raise ValueError(f"position {past + T - 1} exceeds --model.max_seq_len={self.config.max_seq_len}")
            if attention_mask is None:  # every row at past..past+T-1: a slice of the tables, no gather
                cos, sin = self.rotary.span(past, T)
            else:  # positions count real tokens only, so left padding is invisible
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
                cos, sin = self.rotary(positions)
        else:
            if int(positions.max()) >= self.config.max_seq_len:  # caller-made positions: check them
                raise ValueError(f"position {int(positions.max())} exceeds --model.max_seq_len={self.config.max_seq_len}")
            cos, sin = self.rotary(positions)
        mask = self._attention_mask(T, past, attention_mask, ids.device)
        x = self.embed_dropout(self.embed_tokens(ids))
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for block in self.layers:
            if recompute:  # non-reentrant: works with FSDP2 and keyword-free calls, restores the dropout RNG
                x = checkpoint(block, x, cos, sin, mask, None, use_reentrant=False,
                               context_fn=functools.partial(_recompute_forgets_moe_records, block))
            else:
                x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)

    def forward(
        self,
        ids: Tensor,
        kv_cache: KVCache | None = None,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """ids (B, T) -> logits (B, T, V) in float32; (B, 1, V) with `last_only` (a prefill needs no more, and
        the vocabulary projection is a quarter of a small model's compute); (N, V) with `logits_at`, a (B, T) bool
        mask, for its N True positions in row-major order (RL scores reply tokens only: most positions of a
        prompt + reply row are prompt)."""
        hidden = self.forward_hidden(ids, kv_cache, positions, attention_mask)
        if logits_at is not None:
            hidden = hidden[logits_at]
        elif last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden).float()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once by parameters()
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def set_attention_impl(self, use_sdpa: bool) -> None:
        for block in self.layers:
            block.self_attn.use_sdpa = use_sdpa


def _recompute_forgets_moe_records(block: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Contexts (first forward, recomputation) for `checkpoint`.

    subtle: an MoE layer records its router's aux loss on every training forward (model/moe.py `_record`), and the
    recomputation during backward can be one too: by default `checkpoint` stops recomputing once the saved tensors
    are back, before the record, but without that early stop the record would leak into the next step's aux loss."""

    @contextlib.contextmanager
    def recomputing():
        records = [(m, len(m._pending)) for m in block.modules() if hasattr(m, "_pending")]
        try:
            yield
        finally:
            for module, n in records:
                del module._pending[n:]

    return contextlib.nullcontext(), recomputing()
