"""Per-token log-probabilities of given tokens: what DPO, PPO and GRPO compare between policy and reference.

Alignment (the usual off-by-one trap): logits at position t predict token t+1, so targets are ids[:, 1:] and the
response mask is shifted the same way. Worked example, prompt p0 p1 and reply r0 r1:
    ids            = [p0 p1 r0 r1]      response_mask = [0 0 1 1]
    model input    = [p0 p1 r0]         (the last token predicts nothing we score)
    targets        = [p1 r0 r1]         mask[:, 1:]   = [0 1 1]
so the scored log-probs are log π(r0 | p0 p1) and log π(r1 | p0 p1 r0), and the prompt is never scored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per position: (B, T, V), (B, T) -> (B, T), in float32.

    One row at a time, so the float32 copy of the logits (and logsumexp's scratch) is (T, V), never (B, T, V):
    with a large vocabulary that copy, not the model, is what runs out of memory. The rows come from `unbind`,
    whose backward stacks the B row gradients once; indexing `logits[b]` instead makes every row's backward
    write a zero-filled (B, T, V) gradient, B times over: quadratic in the batch, and most of an RL step's time.
    """
    rows = [row.float().gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(row.float(), dim=-1)
            for row, target in zip(logits.unbind(0), targets.unbind(0))]  # (T,) each; .float() is free in float32
    return torch.stack(rows)


def _at_positions(mask: Tensor, values: Tensor) -> Tensor:
    """(B, T) tensor holding `values` (N,) at the N True positions of `mask`, row-major, and 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def response_token_logprobs(
    model: nn.Module, ids: Tensor, response_mask: Tensor, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Log-probs of ids[:, 1:] under model, (B, T-1), and the mask aligned to them, response_mask[:, 1:] (B, T-1).

    Only the masked positions are scored (0 elsewhere): the vocabulary projection and its softmax run on the reply
    tokens alone, not on every prompt token (`GPT.forward(logits_at=...)`), which in an RL batch of short replies
    to longer prompts is most of the head's work and nearly all of its memory.
    ids (B, T) prompt + response, right-padded (pads sit after every scored token, so causal attention never
    lets a scored token see them); pass attention_mask (B, T), True = real token, for left-padded rows.
    """
    inputs, targets, mask = ids[:, :-1], ids[:, 1:], response_mask[:, 1:].bool()
    if attention_mask is None:
        logits = model(inputs, logits_at=mask)  # (N, V) for the N scored positions
    else:
        logits = model(inputs, attention_mask=attention_mask[:, :-1], logits_at=mask)
    scored = token_logprobs(logits[None], targets[mask][None])[0]  # (N,)
    return _at_positions(mask, scored), mask


def response_token_kl(model: nn.Module, reference: nn.Module, ids: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Exact KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) = Σ_v π(v) (log π(v) − log π_ref(v)) at every response position,
    (B, T-1), with the aligned mask (B, T-1). Summed over the whole vocabulary rather than estimated from the one
    token in the row, so it is never negative (k1 on a single token is, whenever π_ref gave that token more
    probability than π does: greedy replies after training make that common)."""
    mask = response_mask[:, 1:].bool()
    logp = torch.log_softmax(model(ids[:, :-1], logits_at=mask).float(), dim=-1)  # (N, V) at the N reply tokens
    ref_logp = torch.log_softmax(reference(ids[:, :-1], logits_at=mask).float(), dim=-1)
    kl = (logp.exp() * (logp - ref_logp)).sum(-1).clamp_min(0.0)  # clamp: float rounding only, the sum is >= 0
    return _at_positions(mask, kl), mask


def sequence_logprobs(
    model: nn.Module, ids: Tensor, response_mask: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """Summed log-prob of each row's response tokens, log π(y | x) = Σ_t log π(y_t | x, y_<t), shape (B,)."""
    logprobs, mask = response_token_logprobs(model, ids, response_mask, attention_mask)
    return (logprobs * mask.to(logprobs.dtype)).sum(-1)
