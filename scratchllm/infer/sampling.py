"""Sampling as pure functions over next-token logits (B, V): penalties, temperature, top-k, top-p, min-p.

Each filter returns new logits with excluded tokens at -inf, so they compose in any order the caller
chooses; `sample` draws with an explicit torch.Generator so the same seed gives the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off (nucleus sampling, Holtzman et al. 2019)
    min_p: float = 0.0  # 0 = off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1 = off (CTRL, Keskar et al. 2019)
    presence_penalty: float = 0.0  # OpenAI: subtract once if the token appeared
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("top_k must be >= 0 and repetition_penalty > 0")


def apply_repetition_penalty(logits: Tensor, counts: Tensor, penalty: float) -> Tensor:
    """Seen tokens: positive logits divided by `penalty`, negative ones multiplied (CTRL)."""
    if penalty == 1.0:
        return logits
    seen = counts > 0
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """logit - frequency·count - presence·[count > 0] (OpenAI API definition)."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    # subtle: a token is dropped only if the mass *before* it already reaches p, so the top token always stays.
    drop_sorted = probs.cumsum(-1) - probs >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: Tensor, counts: Tensor, params: SamplingParams) -> Tensor:
    """Penalties, then temperature, then the truncation filters (the order used by vLLM and HF)."""
    logits = apply_repetition_penalty(logits.float(), counts, params.repetition_penalty)
    logits = apply_presence_frequency(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.temperature > 0:
        logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Processed logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_from_uniforms(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF sampling: processed logits (B, V) and one uniform in [0, 1) per row -> next ids (B,).

    Row r takes the first token whose cumulative probability exceeds u_r * (total mass), so a zero-probability
    token is never drawn. With each row's uniforms drawn from its own generator, a whole batch samples in one
    vectorised call and a row's draw still depends only on its own seed (the engine's per-row seeds)."""
    probs = logits.softmax(-1).double()  # float64: the last entries of a long cumsum stay ordered
    cdf = probs.cumsum(-1)
    targets = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)
    drawn = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    last_possible = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # a u rounded up to 1 lands here
    return torch.minimum(drawn, last_possible)
