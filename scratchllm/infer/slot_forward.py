"""The serving forward: the GPT run over a slot KV cache with per-row positions, its weights fused for inference.

GPT.forward is the training forward (one length shared by every row, modules called as declared). A serving batch
mixes rows of different lengths, and a small model's decode step is mostly per-operation overhead, not arithmetic
(torch.profiler, `mini` at batch 1 on 2 CPU threads: ~180 operations a step, the matmuls under half its time;
docs/benchmarks.md). So this forward does fewer, larger operations: one matmul for q/k/v and one for gate/up (the
weights are concatenated here, once, with the RMSNorm gains folded in, and every weight is copied as (in, out) so
each projection is a plain matmul: the model's parameters, state_dict and export are untouched), RoPE over a whole
q/k/v output in one call with its rotation looked up in a precomputed table, one `index_copy_` per layer for its
new keys and values, residual adds inside `addmm`, and decode attention as two batched matmuls over a view of the
cache (GQA by grouping each K/V head's query heads, no K/V copies). `compile=True` also runs the decode step
through torch.compile, built in the background. tests/infer/test_slot_forward.py holds its logits equal to
GPT.forward's.
"""

from __future__ import annotations

import copy
import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.model.gpt import GPT
from scratchllm.model.kv_cache import SlotKVCache
from scratchllm.model.layers import SDPA_HAS_GQA, Block, RMSNorm, SwiGLU


def _plain(linear: nn.Module) -> bool:
    """An nn.Linear without bias, not a subclass or a replacement (LoRA, int8): its weight is all it computes."""
    return type(linear) is nn.Linear and linear.bias is None


def _fold(norm: RMSNorm, linears: list[nn.Module]) -> Tensor:
    """One weight for `linears` applied to norm(x), laid out (in, out): W·(g ⊙ n) = (W·diag(g))·n, so the norm's
    gain g moves into the concatenated weight (computed in float32, rounded once to the weights' dtype)."""
    weight = torch.cat([m.weight.detach().float() for m in linears]) * norm.weight.detach().float()
    return _in_out(weight.to(linears[0].weight.dtype))


def _in_out(weight: Tensor) -> Tensor:
    """A Linear's (out, in) weight copied as (in, out), so `x @ w` is a plain matmul: on CPU, for the few rows of a
    decode step, MKL runs that up to twice as fast as F.linear's transposed operand (docs/benchmarks.md)."""
    return weight.detach().t().contiguous()


def _rms(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without its gain (folded into the next weight), in float32 as RMSNorm computes it, in one call."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], eps=eps)
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


class _Layer:
    """One block as the serving forward calls it, on a residual stream of any leading shape: (B, T, d_model) in
    prefill, (B, d_model) in decode. Fused: every projection is a plain matmul on an (in, out) copy of its weight,
    q/k/v one matmul and gate/up one, each with its RMSNorm gain folded in; a projection that is not a plain Linear
    (LoRA, int8, MoE) is called as its module instead, and so is every one with `fuse=False`."""

    def __init__(self, block: Block, fuse: bool) -> None:
        attn, mlp = block.self_attn, block.mlp
        self.H, self.K, self.D = attn.n_heads, attn.n_kv_heads, attn.d_head
        self.attn, self.mlp = attn, mlp
        self.input_norm, self.post_norm = block.input_layernorm, block.post_attention_layernorm
        self.o_proj = attn.o_proj
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.qkv_weight = _fold(self.input_norm, qkv) if fuse and all(map(_plain, qkv)) else None
        gate_up = [mlp.gate_proj, mlp.up_proj] if isinstance(mlp, SwiGLU) else []
        self.gate_up_weight = _fold(self.post_norm, gate_up) if fuse and gate_up and all(map(_plain, gate_up)) else None
        self.down_proj = mlp.down_proj if isinstance(mlp, SwiGLU) else None
        self.o_weight = _in_out(self.o_proj.weight) if fuse and _plain(self.o_proj) else None
        self.down_weight = _in_out(self.down_proj.weight) if fuse and self.gate_up_weight is not None \
            and _plain(self.down_proj) else None

    def qkv(self, x: Tensor) -> Tensor:
        """Residual stream (..., d_model) -> (..., H+2K, D): query heads, then key heads, then value heads."""
        if self.qkv_weight is not None:
            out = _rms(x, self.input_norm.eps) @ self.qkv_weight
        else:
            h = self.input_norm(x)
            out = torch.cat([self.attn.q_proj(h), self.attn.k_proj(h), self.attn.v_proj(h)], dim=-1)
        return out.unflatten(-1, (self.H + 2 * self.K, self.D))  # (..., H+2K, D)

    def attn_residual(self, x: Tensor, y: Tensor) -> Tensor:
        """x + o_proj(y): attention's output (..., H*D) added to the residual stream."""
        return _add_linear(x, y, self.o_weight, self.o_proj)

    def mlp_residual(self, x: Tensor) -> Tensor:
        """x + mlp(norm(x))."""
        if self.gate_up_weight is None:
            return x + self.mlp(self.post_norm(x))
        gate, up = (_rms(x, self.post_norm.eps) @ self.gate_up_weight).chunk(2, dim=-1)
        return _add_linear(x, F.silu(gate) * up, self.down_weight, self.down_proj)


def _add_linear(x: Tensor, y: Tensor, weight: Tensor | None, linear: nn.Module) -> Tensor:
    """x + linear(y); with the linear's (in, out) `weight` one addmm (the residual add rides in the matmul)."""
    if weight is None:
        return x + linear(y)
    if x.dim() == 2:
        return torch.addmm(x, y, weight)
    return torch.addmm(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), weight).view(x.shape)


class SlotForward:
    """`prefill` (any slots, T positions each) and `decode` (slots 0..B-1, one position each) over a SlotKVCache.

    `fuse=False` calls every projection as the model declares it (the fused, (in, out) copies hold the weights of
    the blocks and the lm_head a second time in memory). The fused weights are a snapshot: build a new SlotForward
    after changing the model's weights.

    `compile=True` compiles the decode step with torch.compile on a background thread (`_compile`; a scratch cache
    of the same shape lives as long as that takes) while `decode` runs eagerly, and switches to it once built
    (`wait_compiled` blocks until then). Dynamic shapes: one graph for batch 1 and one for every other batch size
    and length; a shape neither fits runs eagerly rather than compiling mid-serving. On CUDA it asks for mode
    "reduce-overhead", which replays the step as CUDA graphs, with kv_len rounded up so their number stays small
    (untested: no GPU was available when it was written)."""

    def __init__(self, model: GPT, cache: SlotKVCache, fuse: bool = True, compile: bool = False) -> None:
        self.model, self.cache = model, cache
        self.layers = [_Layer(block, fuse) for block in model.layers]
        self.final_norm, self.lm_head = model.norm, model.lm_head
        self.head_weight = _fold(model.norm, [model.lm_head]) if fuse and _plain(model.lm_head) else None
        self.window = model.config.sliding_window
        self.max_pos = model.config.max_seq_len - 1
        # RoPE with the rotation folded into the table: rotate_half(x) * sin == swap_halves(x) * signed_sin; tables
        # for every position and head of a q/k/v output, so a step looks its rotation up with one gather.
        self.H, self.K = self.layers[0].H, self.layers[0].K
        self.rope_cos, self.rope_sin = self._rope_tables(model, cache.kv[0].dtype)
        # Decode-step bookkeeping that never changes, made once: the flat cache rows of each slot's position 0
        # (write_index is linear in the position, so position p is p rows on) and the key positions.
        S = cache.shape[0]
        self.slot_rows = cache.write_index(torch.arange(S), torch.zeros(S, 1, dtype=torch.long)).view(S, -1)
        self.slot_rows = self.slot_rows.to(cache.kv[0].device)  # (S, 2K)
        self.key_positions = torch.arange(cache.shape[2], device=cache.kv[0].device)
        self.head_views = [self._head_views(i) for i in range(len(self.layers))]
        # On CUDA, "reduce-overhead" replays the step as CUDA graphs, one per shape: kv_len is rounded up to a
        # multiple of this (the extra keys are masked), so a run records a few graphs, not one per length.
        self.cuda_graphs = compile and cache.kv[0].is_cuda
        self.kv_len_step = 64 if self.cuda_graphs else 1
        self._compiled = None  # the compiled step, once it is built
        self.compile_error: str | None = None
        self.compiling: threading.Thread | None = None
        if compile:
            self.compiling = threading.Thread(target=self._compile, daemon=True, name="scratchllm-compile")
            self.compiling.start()

    def _compile(self) -> None:
        """Build the compiled decode step on a scratch copy of the cache, then hand it to `decode`.

        Runs on its own thread, so decoding goes on eagerly meanwhile (it takes minutes on a small CPU). The step is
        compiled with dynamic shapes; torch.compile specialises batch 1, so it is run at batch 1 and 2: the two
        graphs any later batch size and length reuse. Guards check shapes and constants, not which cache or which
        SlotForward, so what was built on the scratch cache serves this one. A failure is reported as a warning and
        in `compile_error`, and the step stays eager."""
        scratch = copy.copy(self)
        scratch.cache = copy.copy(self.cache)
        # subtle: an inference-mode tensor (a cache made under torch.inference_mode) is another graph's input
        with torch.inference_mode(self.cache.kv[0].is_inference()):
            scratch.cache.kv = [torch.zeros_like(flat) for flat in self.cache.kv]
        compiled = torch.compile(type(self)._decode, dynamic=True,
                                 mode="reduce-overhead" if self.cuda_graphs else None)
        device = self.slot_rows.device
        kv_len = min(64, self.cache.shape[2])  # a typical length: inductor tunes its kernels for the sizes it sees
        try:
            with torch.inference_mode():  # as the engine steps: a different grad mode would be another graph
                for B in (1, 2)[: self.cache.shape[0]]:
                    ids = torch.zeros(B, dtype=torch.long, device=device)
                    compiled(scratch, ids, ids + kv_len - 1, kv_len)
        except Exception as err:  # noqa: BLE001 - any compiler failure leaves the same step, uncompiled
            self.compile_error = f"{type(err).__name__}: {err}"
            warnings.warn(f"torch.compile of the decode step failed ({self.compile_error}); decoding without it",
                          RuntimeWarning, stacklevel=1)
            return
        self._compiled = compiled

    def _rope_tables(self, model: GPT, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, signed sin (max_seq_len, H+2K, D): the rotation of each query and key head at each position, and none
        (cos 1, sin 0) for the value heads, so one call rotates a whole q/k/v output."""
        cos, sin = model.rotary.cos, model.rotary.sin  # (P, D)
        D = cos.shape[1]
        signed_sin = torch.cat([-sin[:, : D // 2], sin[:, D // 2 :]], dim=-1)
        rotated, kept = self.H + self.K, self.K
        cos = torch.cat([cos[:, None].expand(-1, rotated, -1), cos.new_ones(1, 1, D).expand(len(cos), kept, -1)], 1)
        sin = torch.cat([signed_sin[:, None].expand(-1, rotated, -1), sin.new_zeros(1, 1, D).expand(len(sin), kept, -1)], 1)
        return cos.to(dtype), sin.to(dtype)  # (P, H+2K, D)

    @staticmethod
    def _rope(qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """qkv (..., H+2K, D) with q and k rotated (RoPE eq. 34, HF's rotate-half layout); a new tensor."""
        x1, x2 = qkv.chunk(2, dim=-1)
        return torch.addcmul(qkv * cos, torch.cat([x2, x1], dim=-1), sin)

    def _visible(self, keys: Tensor, positions: Tensor) -> Tensor:
        """keys (L,), positions (..., T) -> (..., T, L) bool: causal, and within the sliding window if any."""
        visible = keys <= positions[..., None]
        if self.window:
            visible &= positions[..., None] - keys < self.window
        return visible

    def prefill(self, ids: Tensor, slots: list[int], starts: Tensor, kv_len: int) -> Tensor:
        """ids (B, T) for the rows in `slots`, row b's tokens at positions starts[b]+t -> the residual stream after
        the last block (B, T, d_model); `logits` takes it from there. `kv_len` >= max(starts) + T.

        Right-padded rows write junk past their length, which is harmless: a row's positions >= its length are
        overwritten before anything may attend to them."""
        B, T = ids.shape
        cache = self.cache
        positions = starts[:, None] + torch.arange(T, device=ids.device)  # (B, T)
        mask = self._visible(torch.arange(kv_len, device=ids.device), positions)[:, None]  # (B, 1, T, kv_len)
        slot_ids = torch.tensor(slots, device=ids.device)
        index = cache.write_index(slot_ids, positions)
        # Rows in consecutive slots are read as a view; other sets are gathered.
        read = slice(slots[0], slots[0] + B) if slots == list(range(slots[0], slots[0] + B)) else slot_ids
        x = self.model.embed_tokens(ids)
        at = positions.clamp(max=self.max_pos)  # padded prefill positions past the context are junk anyway
        cos, sin = self.rope_cos[at], self.rope_sin[at]  # (B, T, H+2K, D)
        for i, layer in enumerate(self.layers):
            H, K = layer.H, layer.K
            qkv = self._rope(layer.qkv(x), cos, sin)  # (B, T, H+2K, D)
            cache.write(i, index, qkv[:, :, H:])
            q = qkv[:, :, :H].transpose(1, 2)  # (B, H, T, D)
            k_all = cache.keys(i)[read, :, :kv_len]  # (B, K, kv_len, D)
            v_all = cache.values(i)[read, :, :kv_len]
            if SDPA_HAS_GQA:
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=H > K)
            else:
                k_all, v_all = k_all.repeat_interleave(H // K, dim=1), v_all.repeat_interleave(H // K, dim=1)
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
            x = layer.attn_residual(x, y.transpose(1, 2).reshape(B, T, H * layer.D))  # (B, T, H*D)
            x = layer.mlp_residual(x)
        return x

    def logits(self, x: Tensor) -> Tensor:
        """(N, d_model) residual stream after the last block -> (N, V) float32 logits (final norm included)."""
        if self.head_weight is None:
            return self.lm_head(self.final_norm(x)).float()
        return (_rms(x, self.final_norm.eps) @ self.head_weight).float()

    def decode(self, ids: Tensor, lengths: Tensor, kv_len: int) -> Tensor:
        """ids (B,) of the rows in slots 0..B-1, each at position lengths[b] -> logits (B, V) float32.
        `kv_len` >= max(lengths) + 1: the keys read (a Python int, so no host sync). `ids` and `lengths` are fresh
        tensors (the compiled step guards on their strides and offsets: a view into a larger tensor is a new graph).

        Compiled once `compile=True` has built the compiled step, eager until then; a compiler that fails later (on
        a shape it has not seen) is reported once and the step runs eagerly from then on (the cache writes are
        idempotent, so a step that failed half-way is simply redone)."""
        compiled = self._compiled
        if compiled is not None:
            if self.kv_len_step > 1:
                kv_len = min(-(-kv_len // self.kv_len_step) * self.kv_len_step, self.key_positions.shape[0])
            try:
                # A shape no warm-up graph fits runs eagerly instead of stalling every stream for a new compile.
                with torch.compiler.set_stance("eager_on_recompile"):
                    return compiled(self, ids, lengths, kv_len)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same step, uncompiled
                self.compile_error = f"{type(err).__name__}: {err}"
                warnings.warn(f"torch.compile of the decode step failed ({self.compile_error}); decoding without it",
                              RuntimeWarning, stacklevel=2)
                self._compiled = None
        return self._decode(ids, lengths, kv_len)

    def wait_compiled(self, timeout_s: float | None = None) -> bool:
        """Block until the compiled step is built (or failed); True if decode now runs it."""
        if self.compiling is not None:
            self.compiling.join(timeout_s)
        return self._compiled is not None

    def _head_views(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer `layer`'s keys and values as (S*K, T, D) views: row s*K + k is slot s's K/V head k."""
        T, D = self.cache.shape[2:]
        return self.cache.keys(layer).view(-1, T, D), self.cache.values(layer).view(-1, T, D)

    def _decode(self, ids: Tensor, lengths: Tensor, kv_len: int) -> Tensor:
        """The decode step (see `decode`), on a (B, d_model) residual stream. Attention per K/V head: its G query
        heads are the rows of one (G, D) @ (D, L) matmul, plus an additive mask (-inf where a key is past the row's
        length or outside the window)."""
        B = ids.shape[0]
        H, K, D = self.H, self.K, self.layers[0].D
        index = (self.slot_rows[:B] + lengths[:, None]).flatten()  # (B*2K,): each row's keys, then values
        x = self.model.embed_tokens(ids)  # (B, d_model)
        visible = self._visible(self.key_positions[:kv_len], lengths)  # (B, L)
        bias = torch.where(visible, 0.0, float("-inf")).to(x.dtype)
        bias = bias.repeat_interleave(K, dim=0)[:, None]  # (B*K, 1, L), broadcast over each head's G queries
        # no clamp as in prefill: a decode position is below max_seq_len (the engine caps every row's budget)
        cos, sin = self.rope_cos[lengths], self.rope_sin[lengths]  # (B, H+2K, D)
        for i, layer in enumerate(self.layers):
            qkv = self._rope(layer.qkv(x), cos, sin)  # (B, H+2K, D)
            self.cache.write(i, index, qkv[:, H:])
            q = qkv[:, :H].reshape(B * K, H // K, D)  # (B*K, G, D): query head h = k*G + g reads K/V head k
            # subtle: torch.compile refuses inputs that alias the cache it writes, so compiled it takes fresh views
            keys, values = self._head_views(i) if torch.compiler.is_compiling() else self.head_views[i]
            k_all, v_all = keys[: B * K, :kv_len], values[: B * K, :kv_len]  # (B*K, L, D), views
            scores = torch.baddbmm(bias, q, k_all.mT, alpha=1 / math.sqrt(D))  # (B*K, G, L)
            y = torch.bmm(scores.softmax(-1), v_all).view(B, H * D)  # (B*K, G, D) -> (B, H*D)
            x = layer.mlp_residual(layer.attn_residual(x, y))
        return self.logits(x)
