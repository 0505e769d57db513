"""Per-token log-probabilities of given tokens: what DPO, PPO and GRPO compare between policy and reference.

Alignment (the usual off-by-one trap): logits at position t predict token t+1. For ids = [p0 p1 r0 r1]
with response mask [0 0 1 1], the scored targets are ids[1:] = [p1 r0 r1] with mask[1:] = [0 1 1].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per position: (B, T, V), (B, T) -> (B, T), in float32."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def response_token_logprobs(model: nn.Module, ids: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) ids and mask -> log-probs of ids[:, 1:] (B, T-1) and the aligned mask[:, 1:]."""
    logits = model(ids[:, :-1])
    return token_logprobs(logits, ids[:, 1:]), response_mask[:, 1:]


def sequence_logprobs(model: nn.Module, ids: Tensor, response_mask: Tensor) -> Tensor:
    """Summed log-prob of the response tokens of each row (B,)."""
    logprobs, mask = response_token_logprobs(model, ids, response_mask)
    return (logprobs * mask.to(logprobs.dtype)).sum(-1)
