"""Batched generation over token ids with the KV cache: prefill once, then one token per step per row.

Knows nothing about text (nanochat's engine contract): ids in, ids out. Prompts of different lengths are
left-padded and masked, so a batch gives the same tokens as running each prompt alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from scratchllm.infer.sampling import SamplingParams, process_logits, sample, sample_from_uniforms
from scratchllm.model.gpt import GPT
from scratchllm.model.kv_cache import KVCache


@dataclass
class Step:
    tokens: Tensor  # (B,) the token chosen for each row this step (meaningless where `active` is False)
    active: Tensor  # (B,) bool: the row was still generating when this token was chosen
    finished: Tensor  # (B,) bool: the row has stopped (after this step)


def _row_uniforms(seed: int | None, n: int) -> Tensor:
    return torch.rand(n, dtype=torch.float64, generator=None if seed is None else torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams | list[SamplingParams] | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    seed: int | list[int | None] | None = None,
    pad_id: int = 0,
    drop_finished: bool = True,
) -> Iterator[Step]:
    """Yield one `Step` per generated position until every row stopped or max_new_tokens is reached.

    `params` and `seed` may be given per row (the server batches requests with different settings). Each
    row samples from its own generator (seed + row for an int seed), so a row's text does not depend on
    what else is in the batch. `drop_finished=False` keeps finished rows in the batch to the end (the engine
    before; benchmarks/bench_generation.py measures against it).
    """
    params = params or SamplingParams()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    B, longest = len(prompts), max(len(p) for p in prompts)
    budget = min(max_new_tokens, model.config.max_seq_len - longest)
    if budget <= 0:
        raise ValueError(f"prompt of {longest} tokens leaves no room in max_seq_len={model.config.max_seq_len}")
    ids = torch.full((B, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, longest + budget, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the same index
        ids[row, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, longest - len(prompt) : longest] = True
    V = model.config.vocab_size
    counts = torch.zeros(B, V, device=device)  # generated-token counts for the penalties
    row_params = params if isinstance(params, list) else [params] * B
    seeds = seed if isinstance(seed, list) else [None if seed is None else seed + row for row in range(B)]
    # Seeded rows draw all their uniforms up front from their own generator (one call per row, not per step);
    # sampling is then one vectorised inverse-CDF call, and a row's text still depends only on its seed.
    uniforms = None if seed is None else torch.stack([_row_uniforms(s, max(budget, 1)) for s in seeds]).to(device)
    greedy = torch.tensor([p.temperature == 0 for p in row_params], device=device)
    uniform = not isinstance(params, list) and seed is None  # one vectorised sampling call for the whole batch
    local_kv_heads = model.layers[0].self_attn.n_kv_heads  # this process's share under tensor parallelism
    cache = KVCache(model.config, B, longest + budget, device=device, dtype=next(model.parameters()).dtype,
                    n_kv_heads=local_kv_heads)
    logits = model(ids, kv_cache=cache, attention_mask=mask[:, :longest], last_only=True)[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    # `rows`: which of the B rows the cache holds; the per-row state (counts, mask, uniforms, settings) is kept in
    # the cache's row order. Finished rows feed padding until a quarter of the cache has finished, then everything
    # drops them at once: short replies stop paying for the longest one.
    rows = torch.arange(B, device=device)
    for step in range(budget):
        live = ~finished[rows]
        if uniform:
            chosen = sample(process_logits(logits, counts, row_params[0]), row_params[0])
        else:
            processed = process_logits(logits, counts, row_params[0]) if not isinstance(params, list) else torch.cat(
                [process_logits(logits[i : i + 1], counts[i : i + 1], p) for i, p in enumerate(row_params)])
            if uniforms is not None:
                drawn = sample_from_uniforms(processed, uniforms[:, step])
            else:  # per-row settings without seeds: each row draws from the global generator
                drawn = torch.cat([sample(processed[i : i + 1], p) for i, p in enumerate(row_params)])
            chosen = torch.where(greedy, processed.argmax(-1), drawn)
        chosen = torch.where(live, chosen, torch.full_like(chosen, pad_id))
        active = ~finished
        next_ids = torch.full((B,), pad_id, dtype=torch.long, device=device)
        next_ids[rows] = chosen
        counts[live, chosen[live]] += 1
        done = ~live | torch.isin(chosen, stop)
        finished[rows] = done
        yield Step(next_ids, active, finished.clone())
        if bool(finished.all()) or step == budget - 1:
            return
        mask[:, longest + step] = live  # finished rows feed padding that nobody attends to
        if drop_finished and int(done.sum()) * 4 >= len(rows):
            keep = (~done).nonzero().squeeze(1)
            cache.reorder(keep)
            rows, chosen, counts, mask, greedy = rows[keep], chosen[keep], counts[keep], mask[keep], greedy[keep]
            uniforms = None if uniforms is None else uniforms[keep]
            row_params = [row_params[i] for i in keep.tolist()]
        logits = model(chosen[:, None], kv_cache=cache, attention_mask=mask[:, : longest + step + 1])[:, -1]


def generate_batch(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams | list[SamplingParams] | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    seed: int | list[int | None] | None = None,
    pad_id: int = 0,
    drop_finished: bool = True,
) -> tuple[list[list[int]], list[bool]]:
    """All generated ids per row (including the stop token if one was hit) and whether each row stopped."""
    out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for step in generate(model, prompts, max_new_tokens, params, stop_ids, seed, pad_id, drop_finished):
        for row in range(len(prompts)):
            if step.active[row]:
                out[row].append(int(step.tokens[row]))
        stopped = [bool(f) for f in step.finished]
    return out, stopped
