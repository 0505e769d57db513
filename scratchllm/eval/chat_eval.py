"""Held-out chat metrics measured by generating: end-of-reply rate and verifiable-task pass@1 (greedy).

The same functions score every checkpoint in the pipeline's comparison table, so pretrain, SFT, DPO,
PPO and GRPO are measured on identical prompts with identical decoding.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, OrderedDict, defaultdict
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from scratchllm.data.chat_batches import length_sorted_chunks
from scratchllm.data.rewards import score_task
from scratchllm.data.tasks import canonical_reply
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import SamplingParams
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.chat import render_for_completion, reply_stop_ids

# Replies already generated in this process, by what determines them (weights, prompts, decoding, seed). The
# pipeline measures each model more than once on the same set: a stage's final evaluation, the next stage's step 0
# and the report all ask the same greedy questions of the same weights; the answers are computed once.
_REPLIES: OrderedDict[str, list[tuple[str, bool]]] = OrderedDict()
_REPLIES_KEPT = 64
_HASHED_PARAMETERS_MAX = 50_000_000  # hashing a larger model's weights costs more than it saves: not memoised


def weights_digest(model: nn.Module) -> str | None:
    """A content hash of every parameter and buffer (names, dtypes, bytes); None for a model too large to hash."""
    state = model.state_dict()
    if sum(t.numel() for t in state.values()) > _HASHED_PARAMETERS_MAX or any(type(t) is not torch.Tensor for t in state.values()):
        return None  # too large, or sharded (a DTensor's bytes are only this rank's shard)
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in state.items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _replies_key(model: nn.Module, tok: Tokenizer, prompts: list, max_new_tokens: int, batch_size: int,
                 params: SamplingParams, seed: int | None) -> str | None:
    weights = weights_digest(model)
    if weights is None:
        return None
    device = next(model.parameters()).device
    spec = json.dumps([tok.fingerprint(), prompts, max_new_tokens, batch_size, asdict(params), seed, str(device), torch.get_num_threads()],
                      ensure_ascii=False)
    return weights + hashlib.blake2b(spec.encode(), digest_size=16).hexdigest()


@torch.no_grad()
def generate_replies(
    model: nn.Module, tok: Tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int = 32,
    batch_size: int = 64, params: SamplingParams | None = None, seed: int | None = None,
) -> list[tuple[str, bool]]:
    """(reply text without the end token, whether the reply ended with <|im_end|>) per prompt.

    Memoised in this process on everything that determines the replies (`_REPLIES`): the same weights asked the
    same prompts with the same decoding and seed get the replies computed the first time."""
    params = params or SamplingParams(temperature=0.0)
    key = _replies_key(model, tok, prompts, max_new_tokens, batch_size, params, seed)
    if key is not None and key in _REPLIES:
        _REPLIES.move_to_end(key)
        return list(_REPLIES[key])
    out = _generate_replies(model, tok, prompts, max_new_tokens, batch_size, params, seed)
    if key is not None:
        _REPLIES[key] = list(out)
        while len(_REPLIES) > _REPLIES_KEPT:
            _REPLIES.popitem(last=False)
    return out


def _generate_replies(model: nn.Module, tok: Tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                      batch_size: int, params: SamplingParams, seed: int | None) -> list[tuple[str, bool]]:
    stop_ids = reply_stop_ids(tok)
    was_training = model.training
    model.eval()
    rendered = [render_for_completion(tok, p) for p in prompts]
    out: list[tuple[str, bool]] = [("", False)] * len(prompts)
    # Batch prompts of similar length (less left padding to prefill); prompt i keeps seed + i wherever it lands.
    for chunk in length_sorted_chunks([len(r) for r in rendered], batch_size):
        seeds = None if seed is None else [seed + i for i in chunk]
        ids, _ = generate_batch(model, [rendered[i] for i in chunk], max_new_tokens, params, stop_ids, seeds, tok.pad_id)
        for i, row in zip(chunk, ids):
            stopped = bool(row) and row[-1] in stop_ids
            out[i] = (tok.decode(row[:-1] if stopped else row), stopped and row[-1] == tok.im_end_id)
    model.train(was_training)
    return out


def end_of_reply_rate(model: nn.Module, tok: Tokenizer, conversations: list[dict[str, Any]], max_new_tokens: int = 48) -> float:
    """Share of held-out prompts (each conversation up to its last assistant turn) answered with <|im_end|>."""
    prompts = []
    for conv in conversations:
        messages = conv["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(messages[:last])
    replies = generate_replies(model, tok, prompts, max_new_tokens)
    return sum(ended for _, ended in replies) / max(len(replies), 1)


def task_scores(model: nn.Module, tok: Tokenizer, tasks: list[dict[str, Any]], max_new_tokens: int = 24) -> list[float]:
    """Greedy reply to each task, scored by its verifier (1.0 right, 0.0 wrong), in task order."""
    replies = generate_replies(model, tok, [t["prompt"] for t in tasks], max_new_tokens)
    return [score_task(reply, task) for task, (reply, _) in zip(tasks, replies)]


def pass_at_1_by_family(tasks: list[dict[str, Any]], scores: list[float]) -> dict[str, float]:
    """{"pass_at_1": overall mean, "pass_at_1/<family>": each family's mean} from per-task scores."""
    by_family: dict[str, list[float]] = defaultdict(list)
    for task, score in zip(tasks, scores):
        by_family[task["family"]].append(score)
    result = {"pass_at_1": sum(scores) / max(len(scores), 1)}
    result.update({f"pass_at_1/{f}": sum(v) / len(v) for f, v in sorted(by_family.items())})
    return result


def task_pass_at_1(model: nn.Module, tok: Tokenizer, tasks: list[dict[str, Any]], max_new_tokens: int = 24) -> dict[str, float]:
    """Greedy pass@1 overall and per family: {"pass_at_1": …, "pass_at_1/add": …}."""
    return pass_at_1_by_family(tasks, task_scores(model, tok, tasks, max_new_tokens))


def task_sampled_scores(
    model: nn.Module, tok: Tokenizer, tasks: list[dict[str, Any]], samples: int, temperature: float,
    max_new_tokens: int = 24, seed: int = 0,
) -> list[list[float]]:
    """Per task, the verifier's score of each of `samples` replies sampled at `temperature` (seeded: the same
    seed draws the same uniforms for every checkpoint, so two checkpoints' samples are paired)."""
    prompts = [t["prompt"] for t in tasks for _ in range(samples)]
    replies = generate_replies(model, tok, prompts, max_new_tokens, params=SamplingParams(temperature=temperature), seed=seed)
    return [[score_task(replies[i * samples + j][0], task) for j in range(samples)] for i, task in enumerate(tasks)]


def task_sampled_pass_at_1(
    model: nn.Module, tok: Tokenizer, tasks: list[dict[str, Any]], samples: int, temperature: float,
    max_new_tokens: int = 24, seed: int = 0,
) -> dict[str, float]:
    """pass@1 estimated from `samples` sampled replies per task (DeepSeek-R1, arXiv:2501.12948 §3: mean over k).

    pass@1 = 1/N Σ_tasks 1/k Σ_j correct_j, plus pass@k (any of the k right). Greedy pass@1 only moves when the
    right answer becomes the most likely one; this also sees probability mass moving toward it. Seeded.
    """
    per_task = task_sampled_scores(model, tok, tasks, samples, temperature, max_new_tokens, seed)
    n = max(len(tasks), 1)
    return {"sampled_pass_at_1": sum(sum(s) / samples for s in per_task) / n,
            f"sampled_pass_at_{samples}": sum(max(s, default=0.0) for s in per_task) / n}


def constant_answer_scores(train_tasks: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> list[float]:
    """Per-task score of a policy that never reads the question: each task answered with its family's commonest
    answer in the training split. A model whose pass@1 is near this has learned the answer prior, not the task."""
    by_family: dict[str, Counter] = defaultdict(Counter)
    for task in train_tasks:
        by_family[task["family"]][task["answer"]] += 1
    return [score_task(canonical_reply(by_family[t["family"]].most_common(1)[0][0], t["lang"]), t)
            if by_family[t["family"]] else 0.0 for t in tasks]


def constant_answer_by_family(train_tasks: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> dict[str, float]:
    """The answer-prior reference with the keys of `pass_at_1_by_family`: overall and per family."""
    return pass_at_1_by_family(tasks, constant_answer_scores(train_tasks, tasks))
