"""Iteration-level (continuous) batching over token ids: requests join and leave the running batch at every step.

As in Orca (Yu et al., OSDI 2022) the scheduler decides per decode step, not per batch: a finished row leaves at
once and a waiting request is prefilled and joins while the others keep decoding. The KV cache is a set of slots
(one row each, with its own length) rather than vLLM's pages: a request never needs more than `max_seq_len`
positions here, so a slot is a page the size of the context. Running rows are kept in slots 0..n-1 (a leaving
row's slot is refilled by moving the last row into it), so a decode step reads the cache as a view, never a
gather. Prompts are prefilled in chunks of at most `prefill_chunk` tokens per step (Sarathi, Agrawal et al.
2023), so a long prompt delays the running streams by one chunk, not by its whole length. The forward over the
slots is infer/slot_forward.py, the cache model/kv_cache.py `SlotKVCache`.

Knows nothing about text (the engine.py contract): a `Request` receives ids through `on_token`. Sampling matches
engine.py `generate` (same seeded uniforms, same `process_logits`), so a request's tokens equal its solo run.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import astuple, dataclass, field

import torch
from torch import Tensor

from scratchllm.infer.engine import _row_uniforms
from scratchllm.infer.sampling import SamplingParams, process_logits, sample_from_uniforms
from scratchllm.infer.slot_forward import SlotForward
from scratchllm.model.gpt import GPT
from scratchllm.model.kv_cache import SlotKVCache


@dataclass
class TokenLogprob:
    """The model's log-probability of the chosen token and of its `top` most likely alternatives (raw logits,
    before penalties and temperature: what the model believes, as the OpenAI API reports it)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Request:
    """One sequence to generate. The engine thread calls `on_token` / `on_finish` / `on_error`; subclasses
    (the server's jobs) turn them into text. `cancelled` may be set from any thread: the row leaves at the
    next step."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    n_logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the top k
    cancelled: bool = False

    def on_token(self, token: int, logprob: TokenLogprob | None) -> bool:
        """A generated token (never a stop id). Return True to stop here (a stop string matched)."""
        return False

    def on_finish(self, reason: str, n_tokens: int) -> None:
        """reason: "stop" (a stop id or `on_token` said so) or "length"; n_tokens: generated, stop id excluded."""

    def on_error(self, message: str) -> None:
        """The step this request was in failed; it is dropped, the engine carries on."""


@dataclass(eq=False)
class _Row:
    request: Request
    order: int  # admission order: prompts are prefilled first come, first served
    budget: int  # new tokens allowed: max_new_tokens capped by what the context has left
    prefilled: int = 0  # prompt tokens already in the cache
    last_token: int = 0
    n_generated: int = 0
    generated: list[int] = field(default_factory=list)  # for the full-recompute path only

    def __post_init__(self) -> None:
        self.settings = astuple(self.request.params)  # rows with equal settings are processed in one call
        params = self.request.params
        self.greedy = params.temperature == 0
        # only penalties read the counts of generated tokens; rows without them skip counting
        self.penalised = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                          or params.frequency_penalty != 0.0)


class ContinuousEngine:
    """Decodes every request on one thread (`start`), or step by step from a test (`step`).

    Slots 0..n_running-1 hold decoding rows, the next n_prefilling slots rows whose prompts are partly in the cache.
    Each step: drop cancelled rows, admit waiting requests into free slots, prefill up to `prefill_chunk` prompt
    tokens, then decode one token for every running row."""

    def __init__(self, model: GPT, stop_ids: frozenset[int] | set[int], max_batch: int = 32, max_queue: int = 64,
                 prefill_chunk: int = 128, fuse: bool = True, compile: bool = False) -> None:
        """`fuse`, `compile`: see SlotForward (fused inference weights; torch.compile of the decode step, built in the
        background while the step runs uncompiled)."""
        self.model, self.stop_ids, self.max_batch = model.eval(), frozenset(stop_ids), max_batch
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.context = model.config.max_seq_len
        # A model that replaces GPT.forward (a test double, a wrapper) is run by full recompute through its own
        # forward: correct for any such model, and slow; SlotForward would bypass the replacement.
        self.recompute = type(model).forward is not GPT.forward
        weight = next(model.parameters())
        self.device = weight.device
        # + prefill_chunk: a right-padded prefill row may write that far past its own length
        self.cache = SlotKVCache(model.config, max_batch, self.context + prefill_chunk,
                                 model.layers[0].self_attn.n_kv_heads, self.device, weight.dtype)
        self.forward = None if self.recompute else SlotForward(model, self.cache, fuse, compile)
        V = model.config.vocab_size
        self.counts = torch.zeros(max_batch, V, device=self.device)  # generated-token counts, for the penalties
        self.uniforms = torch.zeros(max_batch, self.context, dtype=torch.float64, device=self.device)
        self.slots: list[_Row] = []  # slot i holds self.slots[i]
        self.n_running = 0
        self._admitted = 0
        self.waiting: deque[Request] = deque()
        self._wake = threading.Condition()

    # ---- public -------------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> bool:
        """Queue a request; False when `max_queue` requests are already waiting (the caller answers 429)."""
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if len(request.prompt_ids) >= self.context:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens leaves no room in max_seq_len={self.context}")
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(request)
            self._wake.notify()
        return True

    @property
    def busy_rows(self) -> int:
        return len(self.slots)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def decode_step(self) -> str:
        """"eager", "compiling" (eager meanwhile), "compiled", or "eager (compile failed: <reason>)"."""
        forward = self.forward
        if forward is None or forward.compiling is None:
            return "eager"
        if forward.compile_error is not None:
            return f"eager (compile failed: {forward.compile_error})"
        return "compiled" if forward.wait_compiled(timeout_s=0) else "compiling"

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True, name="scratchllm-continuous")
        thread.start()
        return thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.slots and not self.waiting:
                    self._wake.wait()
            self.step()

    @torch.inference_mode()  # not just no_grad: ops skip autograd's dispatch entirely (less per-op overhead)
    def step(self) -> None:
        """One scheduler iteration. A failure answers the requests in the batch and empties it; the engine lives on."""
        try:
            self._drop_cancelled()
            self._admit()
            self._prefill()
            self._decode()
        except Exception as err:  # noqa: BLE001 - any failure is reported to its requests, never kills the thread
            message = f"{type(err).__name__}: {err}"
            for row in self.slots:
                row.request.on_error(message)
            self.slots, self.n_running = [], 0

    # ---- slots --------------------------------------------------------------------------------------------------
    def _length(self, slot: int) -> int:
        row = self.slots[slot]
        return row.prefilled + max(row.n_generated - 1, 0)  # the newest token is not in the cache yet

    def _move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst, self._length(src))
        self.counts[dst] = self.counts[src]
        self.uniforms[dst] = self.uniforms[src]
        self.slots[dst] = self.slots[src]

    def _remove(self, slot: int) -> None:
        """Free `slot` keeping running rows in 0..n_running-1 and prefilling rows right after them."""
        last = len(self.slots) - 1
        if slot < self.n_running:
            self.n_running -= 1
            if slot != self.n_running:
                self._move(self.n_running, slot)
            slot = self.n_running  # now a hole at the start of the prefilling rows
        if slot != last:
            self._move(last, slot)
        self.slots.pop()

    def _promote(self, slot: int) -> None:
        """A prefilling row whose prompt is all in the cache becomes the last running row (swapped with the
        first prefilling row)."""
        target = self.n_running
        if slot != target:
            self.cache.swap(slot, target, max(self._length(slot), self._length(target)))
            pair, flipped = [slot, target], [target, slot]
            self.counts[pair] = self.counts[flipped]
            self.uniforms[pair] = self.uniforms[flipped]
            self.slots[slot], self.slots[target] = self.slots[target], self.slots[slot]
        self.n_running += 1

    def _finish(self, slot: int, reason: str) -> None:
        row = self.slots[slot]
        row.request.on_finish(reason, row.n_generated)
        self._remove(slot)

    def _drop_cancelled(self) -> None:
        for slot in reversed(range(len(self.slots))):
            if self.slots[slot].request.cancelled:
                self._remove(slot)
        with self._wake:
            if any(r.cancelled for r in self.waiting):
                self.waiting = deque(r for r in self.waiting if not r.cancelled)

    def _admit(self) -> None:
        while len(self.slots) < self.max_batch:
            with self._wake:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            slot = len(self.slots)
            budget = min(request.max_new_tokens, self.context - len(request.prompt_ids))
            # Same draws as engine.py `generate` for a seeded row (its uniforms for `budget` steps, drawn up front),
            # so the tokens equal a solo `generate`; an unseeded row draws from the global generator.
            self.uniforms[slot, :budget] = _row_uniforms(request.seed, budget).to(self.device)
            self.counts[slot].zero_()
            self.slots.append(_Row(request, self._admitted, budget))
            self._admitted += 1

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens of the prefilling rows (in slot order) in one right-padded forward."""
        if len(self.slots) == self.n_running:
            return
        chunks: list[tuple[_Row, int]] = []
        budget = self.prefill_chunk
        for row in sorted(self.slots[self.n_running :], key=lambda r: r.order):
            take = min(len(row.request.prompt_ids) - row.prefilled, budget)
            if take <= 0:
                break
            chunks.append((row, take))
            budget -= take
        if not chunks:
            return
        if self.recompute:
            self._prefill_by_recompute([row for row, _ in chunks])
            return
        T = max(take for _, take in chunks)
        ids = torch.zeros(len(chunks), T, dtype=torch.long)
        for b, (row, take) in enumerate(chunks):
            ids[b, :take] = torch.tensor(row.request.prompt_ids[row.prefilled : row.prefilled + take])
        starts = [row.prefilled for row, _ in chunks]
        hidden = self.forward.prefill(ids.to(self.device), [self.slots.index(r) for r, _ in chunks],
                                      torch.tensor(starts, device=self.device), max(starts) + T)
        done: list[int] = []
        for b, (row, take) in enumerate(chunks):
            row.prefilled += take
            if row.prefilled == len(row.request.prompt_ids):
                done.append(b)
        if not done:
            return
        last = torch.tensor([chunks[b][1] - 1 for b in done], device=self.device)
        logits = self.forward.logits(hidden[done, last])  # (B', V): each finished row's last prompt position
        self._start_decoding([chunks[b][0] for b in done], logits)

    def _start_decoding(self, rows: list[_Row], logits: Tensor) -> None:
        """Rows whose prompt is all in: sample each one's first token, and the ones that go on start decoding."""
        tokens, logprobs = self._sample(logits, [self.slots.index(row) for row in rows])
        for row, token, lp in zip(rows, tokens, logprobs):
            if not self._accept(self.slots.index(row), token, lp):  # earlier promotions may have moved it
                self._promote(self.slots.index(row))

    def _prefill_by_recompute(self, rows: list[_Row]) -> None:
        logits = torch.cat([self.model(torch.tensor([row.request.prompt_ids], device=self.device))[:, -1]
                            for row in rows]).float()
        for row in rows:
            row.prefilled = len(row.request.prompt_ids)
        self._start_decoding(rows, logits)

    def _decode(self) -> None:
        n = self.n_running
        if n == 0:
            return
        if self.recompute:
            logits = torch.cat([self.model(torch.tensor([row.request.prompt_ids + row.generated],
                                                        device=self.device))[:, -1] for row in self.slots[:n]]).float()
        else:
            ids = torch.tensor([row.last_token for row in self.slots[:n]], device=self.device)  # (n,)
            lengths = [self._length(slot) for slot in range(n)]
            logits = self.forward.decode(ids, torch.tensor(lengths, device=self.device), max(lengths) + 1)  # (n, V)
        tokens, logprobs = self._sample(logits, list(range(n)))
        # Backwards: removing slot s only moves rows from slots >= s, which are already handled.
        for slot in reversed(range(n)):
            self._accept(slot, tokens[slot], logprobs[slot])

    def _sample(self, logits: Tensor, slots: list[int]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Next token per row, as engine.py `generate` draws it: penalties/temperature/filters, then the row's
        own uniform for this step (inverse CDF), argmax where the temperature is 0."""
        rows = [self.slots[s] for s in slots]
        if all(row.greedy and not row.penalised for row in rows):
            # Greedy without penalties: every filter keeps the top token, so the choice is the raw maximum. max's
            # indices are argmax's (the first maximum, NaN first too), in a third of the time on CPU.
            chosen = logits.max(-1).indices
        else:
            chosen = self._choose(logits, torch.tensor(slots, device=self.device), rows)
        tokens = chosen.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        wanted = [i for i, row in enumerate(rows) if row.request.n_logprobs is not None]
        if wanted:
            log_probs = logits[wanted].log_softmax(-1)  # (W, V)
            k = max(rows[i].request.n_logprobs or 0 for i in wanted)
            top_values, top_ids = log_probs.topk(k, dim=-1) if k else (log_probs[:, :0], log_probs[:, :0].long())
            picked = log_probs.gather(1, chosen[wanted][:, None]).squeeze(1).tolist()
            for w, i in enumerate(wanted):
                n_top = rows[i].request.n_logprobs or 0
                top = list(zip(top_ids[w, :n_top].tolist(), top_values[w, :n_top].tolist()))
                logprobs[i] = TokenLogprob(picked[w], top)
        return tokens, logprobs

    def _choose(self, logits: Tensor, index: Tensor, rows: list[_Row]) -> Tensor:
        """Tokens for rows in slots `index`: each settings group's logits processed in one call, then greedy rows
        take the maximum and sampled rows their draw, each computed only where needed (the float64 CDF over the
        vocabulary costs more than the rest of a small model's step); penalised rows count what they chose."""
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.settings, []).append(i)
        if len(groups) == 1:
            processed = process_logits(logits, self._counts(index, rows[0]), rows[0].request.params)
        else:
            processed = torch.empty_like(logits)
            for members in groups.values():
                at = torch.tensor(members, device=self.device)
                first = rows[members[0]]
                processed[at] = process_logits(logits[at], self._counts(index[at], first), first.request.params)
        sampled = [i for i, row in enumerate(rows) if not row.greedy]
        if not sampled:
            chosen = processed.max(-1).indices
        else:
            steps = torch.tensor([rows[i].n_generated for i in sampled], device=self.device)
            at = torch.tensor(sampled, device=self.device)
            drawn = sample_from_uniforms(processed[at], self.uniforms[index[at], steps])
            if len(sampled) == len(rows):
                chosen = drawn
            else:
                chosen = processed.argmax(-1)
                chosen[at] = drawn
        if any(row.penalised for row in rows):
            self.counts[index, chosen] += 1
        return chosen

    def _counts(self, index: Tensor, row: _Row) -> Tensor:
        """Generated-token counts of the rows at `index`, gathered only where the settings have a penalty (their
        only reader; process_logits never looks at them otherwise, so an empty tensor stands in)."""
        return self.counts[index] if row.penalised else self.counts[:0]

    def _accept(self, slot: int, token: int, logprob: TokenLogprob | None) -> bool:
        """Hand a sampled token to its request; True if the row finished (and left its slot)."""
        row = self.slots[slot]
        if token in self.stop_ids:
            self._finish(slot, "stop")
            return True
        row.n_generated += 1
        row.last_token = token
        if self.recompute:
            row.generated.append(token)
        if row.request.on_token(token, logprob):
            self._finish(slot, "stop")
            return True
        if row.n_generated >= row.budget:
            self._finish(slot, "length")
            return True
        return False
