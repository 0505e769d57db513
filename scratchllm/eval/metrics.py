"""Held-out language-modelling metrics: loss, perplexity and bits-per-byte.

Bits-per-byte divides the summed cross-entropy (in bits) by the number of UTF-8 bytes the scored tokens
stand for. Unlike loss or perplexity it does not depend on the tokenizer, so models with different
vocabularies, and a model before and after retraining its tokenizer, stay comparable (nanochat's
`evaluate_bpb`). Special tokens (<|endoftext|>) count as zero bytes but their loss still counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Iterable[dict[str, Tensor]], token_bytes: Tensor) -> dict[str, float]:
    """token_bytes (V,): UTF-8 length of each token id. Returns val_loss (nats/token), val_ppl, val_bpb."""
    device = next(model.parameters()).device
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for batch in batches:
        ids, targets = batch["ids"].to(device), batch["targets"].to(device)
        logits = model(ids)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        total_nats += float(nats)
        total_tokens += targets.numel()
        total_bytes += int(token_bytes.to(device)[targets].sum())
    loss = total_nats / max(total_tokens, 1)
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_bpb": total_nats / math.log(2) / max(total_bytes, 1),
    }


def token_byte_lengths(tokenizer, vocab_size: int) -> Tensor:
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for i in range(min(vocab_size, len(tokenizer.vocab))):
        lengths[i] = len(tokenizer.vocab[i])
    return lengths


@torch.no_grad()
def copy_accuracy(model: nn.Module, n_regular_tokens: int, n_sequences: int = 32, length: int = 24,
                  seed: int = 0) -> float:
    """In-context copying: argmax next-token accuracy on the second half of random token sequences said twice.

    The second copy is predictable only by finding the earlier occurrence and copying what followed it, the job
    of induction heads (Olsson et al. 2022, arXiv:2209.11895). A model without them scores about 1/V; answering
    a question about numbers in the prompt needs this skill first. Token ids are drawn from [0, n_regular_tokens),
    i.e. never special tokens."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(0, n_regular_tokens, (n_sequences, length), generator=g)
    ids = torch.cat([half, half], dim=1).to(device)  # (B, 2L)
    predicted = model(ids[:, :-1]).argmax(-1)  # position t predicts token t + 1
    # targets of the second copy, except its first token (nothing before it says which token comes first)
    hits = predicted[:, length:] == ids[:, length + 1 :]
    return float(hits.float().mean())
