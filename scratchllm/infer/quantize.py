"""INT8 weight-only quantization for inference: per-output-channel symmetric int8 weights with float scales.

w[o, :] ≈ s[o]·q[o, :], q ∈ [-127, 127], s[o] = max|w[o, :]| / 127 (absmax, vector-wise: LLM.int8(), Dettmers et
al. 2022, arXiv:2208.07339 §3.1; weights only, activations stay float). A per-output-channel scale factors out of
the matmul, y = (x qᵀ)·s, so no float copy of W is ever kept. Every nn.Linear is replaced, and the token embedding
too: its rows are lm_head's output channels, so a tied embed_tokens/lm_head pair keeps sharing one int8 tensor.
Kernels, measured in benchmarks/bench_int8.py: "dequant" (cast q to the activation dtype, then a float matmul; exact
weight-only semantics), "int8mm" (torch's fused CPU int8-weight matmul; it takes bf16 activations) and "auto":
int8mm for a few rows (decode: reads 1 byte per weight, ~2.5x faster than float32 on lm_head), dequant otherwise
(prefill and scoring: int8mm's cost grows with every row, the cast is paid once per call).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.model.lora import has_lora, merge_lora

Kernel = Literal["auto", "dequant", "int8mm"]
KERNELS: tuple[str, ...] = ("auto", "dequant", "int8mm")
AUTO_INT8MM_MAX_ROWS = 8  # measured on a 2-core AVX-512 CPU: int8mm wins up to ~8 rows (batch-8 decode), then loses
# MoE routers stay float: a rounding error there flips top-k expert choices, and they are E×d, tiny.
SKIP_LINEARS = frozenset({"router"})


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (O, I) float -> (q (O, I) int8, scale (O,) float32), symmetric absmax per output channel.

    Worked example: row [0.5, -1.0, 0.25] -> scale 1/127, q = [64, -127, 32] (63.5 rounds half to even -> 64).
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, q = 0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # -128 unused: keeps the range symmetric
    return q, scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


class Int8Linear(nn.Module):
    """y = (x @ qᵀ) · s (+ b): an nn.Linear whose weight is stored as int8 plus one float scale per output row."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None, kernel: Kernel = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.kernel = kernel

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: Kernel = "auto") -> Int8Linear:
        q, scale = quantize_per_channel(linear.weight)
        return cls(q, scale, linear.bias, kernel)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        fused = self.kernel == "int8mm" or (self.kernel == "auto" and rows <= AUTO_INT8MM_MAX_ROWS)
        if fused and x.device.type == "cpu":
            # subtle: the fused op's float32 path is unvectorised on CPU (~30x slower than bf16 in our measurements)
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight_int8, self.weight_scale.to(torch.bfloat16))
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int8Embedding(nn.Module):
    """Row lookup of an int8 table: row i = q[i]·s[i]. Shares q and s with a tied lm_head."""

    def __init__(self, q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight_int8[ids].to(self.dtype) * self.weight_scale[ids].to(self.dtype)[..., None]


def quantize_int8(model: nn.Module, kernel: Kernel = "auto", embeddings: bool = True) -> nn.Module:
    """Replace every nn.Linear (and nn.Embedding) of `model` with its int8 version, in place; returns the model in eval mode.

    LoRA adapters are merged first: quantizing W₀ and keeping a float B·A beside it would round only half the weight.
    A weight shared by an embedding and a linear (tied lm_head) is quantized once and stays shared.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown int8 kernel {kernel!r}; choose one of {KERNELS}")
    if kernel != "dequant" and not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no _weight_int8pack_mm; use kernel='dequant'")
    if has_lora(model):
        merge_lora(model)
    done: dict[int, tuple[Tensor, Tensor]] = {}  # id(weight) -> (q, scale): tied weights quantized once

    def quantized(weight: Tensor) -> tuple[Tensor, Tensor]:
        if id(weight) not in done:
            done[id(weight)] = quantize_per_channel(weight)
        return done[id(weight)]

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in SKIP_LINEARS:
                q, scale = quantized(child.weight)
                setattr(parent, name, Int8Linear(q, scale, child.bias, kernel))
            elif isinstance(child, nn.Embedding) and embeddings:
                q, scale = quantized(child.weight)
                setattr(parent, name, Int8Embedding(q, scale, child.weight.dtype))
    model.requires_grad_(False)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every persistent parameter and buffer, each shared tensor counted once: the serialized weight size."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
