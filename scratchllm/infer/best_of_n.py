"""Best-of-N sampling: draw N replies, keep the one the reward model scores highest (rejection sampling, InstructGPT §C)."""

from __future__ import annotations

import torch

from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.gpt import GPT
from scratchllm.model.heads import ScalarModel
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.chat import render_for_completion, reply_stop_ids


@torch.no_grad()
def best_of_n(
    policy: GPT, reward_model: ScalarModel, tok: Tokenizer, messages: list[dict[str, str]], n: int,
    max_new_tokens: int = 64, params: SamplingParams | None = None, seed: int | None = None,
) -> tuple[str, list[tuple[str, float]]]:
    """(best reply, every (reply, reward) pair) for one conversation."""
    prompt = render_for_completion(tok, messages)
    params = params or SamplingParams(temperature=1.0)
    stop_ids = reply_stop_ids(tok)
    replies, _ = generate_batch(policy, [prompt] * n, max_new_tokens, params, stop_ids, seed, tok.pad_id)
    rows = [prompt + (r or [tok.eos_id]) for r in replies]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    scores = reward_model(ids, torch.tensor([len(r) for r in rows])).tolist()
    texts = [tok.decode([t for t in r if t not in stop_ids]) for r in replies]
    scored = list(zip(texts, scores))
    return max(scored, key=lambda pair: pair[1])[0], scored
