"""Rollouts for RL: sample replies from the current policy (KV cache), score them token by token.

Returns right-padded prompt+reply ids with a response mask that ends at (and includes) <|im_end|>, and
per-token log-probs recomputed with a full forward pass: the sampler's filtered distribution is not the
policy's, so PPO/GRPO ratios must use the model's own log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scratchllm.data.chat_batches import pad_right
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.logprobs import response_token_logprobs
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.chat import render_for_completion, reply_stop_ids


@dataclass
class Rollout:
    ids: Tensor  # (B, T) prompt + reply, right-padded
    response_mask: Tensor  # (B, T) True on reply tokens (including a final <|im_end|>)
    lengths: Tensor  # (B,) real tokens per row
    texts: list[str]  # replies without the end token
    ended: list[bool]  # the reply finished with <|im_end|>


def rollout_seed(run_seed: int, draw: int, rows: int) -> int:
    """The seed of row 0 of rollout `draw`; row r samples with it + r (infer/engine.py), so no two rows of a run
    share their noise. (run_seed + draw + 1 did: row r of draw k + 1 replayed the draws of row r + 1 of draw k,
    and a toy PPO run learned its reward markedly slower for it.)"""
    return (run_seed * 1_000_003 + draw + 1) * rows


@torch.no_grad()
def sample_rollouts(
    model: nn.Module, tok: Tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int,
    params: SamplingParams, seed: int | None = None,
) -> Rollout:
    was_training = model.training
    model.eval()
    prompt_ids = [render_for_completion(tok, p) for p in prompts]
    stop_ids = reply_stop_ids(tok)
    replies, _ = generate_batch(model, prompt_ids, max_new_tokens, params, stop_ids, seed, tok.pad_id)
    model.train(was_training)
    rows, masks, texts, ended = [], [], [], []
    for prompt, reply in zip(prompt_ids, replies):
        if not reply:  # keep shapes valid: an empty reply still scores one token
            reply = [tok.eos_id]
        rows.append(prompt + reply)
        masks.append([0] * len(prompt) + [1] * len(reply))
        finished = reply[-1] == tok.im_end_id
        ended.append(finished)
        texts.append(tok.decode(reply[:-1] if reply[-1] in stop_ids else reply))
    return Rollout(pad_right(rows, tok.pad_id), pad_right(masks, 0).bool(), torch.tensor([len(r) for r in rows]), texts, ended)


@torch.no_grad()
def rollout_logprobs(model: nn.Module, rollout: Rollout, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the reply tokens (B, T-1) and the aligned mask, without gradients."""
    return response_token_logprobs(model, rollout.ids.to(device), rollout.response_mask.to(device))
