"""The continuous-batching engine, stepped by hand: rows join and leave mid-batch, prompts prefill in chunks, and
every request's tokens equal its solo engine.py `generate` run."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from scratchllm.config import model_preset
from scratchllm.infer.continuous import ContinuousEngine, Request, TokenLogprob
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.gpt import GPT

STOP = frozenset(range(10, 30))  # a wide stop set, so some rows end early on a stop id


@dataclass(eq=False)
class Recorder(Request):
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finish: tuple[str, int] | None = None
    errors: list[str] = field(default_factory=list)
    stop_after: int | None = None  # stand-in for a stop string: stop once this many tokens came

    def on_token(self, token: int, logprob: TokenLogprob | None) -> bool:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        return self.stop_after is not None and len(self.tokens) >= self.stop_after

    def on_finish(self, reason: str, n_tokens: int) -> None:
        self.finish = (reason, n_tokens)

    def on_error(self, message: str) -> None:
        self.errors.append(message)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(model_preset("tiny", vocab_size=300, max_seq_len=256)).eval()


def _requests(n: int, seed: int = 1) -> list[Recorder]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(30, 300, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
        params = SamplingParams(temperature=[0.0, 1.0, 0.7][i % 3], top_p=[1.0, 0.9][i % 2],
                                presence_penalty=0.5 * (i % 2), frequency_penalty=0.3 * (i % 3 == 1))
        out.append(Recorder(prompt, int(torch.randint(1, 40, (1,), generator=g)), params, seed=100 + i))
    return out


def _run(engine: ContinuousEngine, requests: list[Request], every: int) -> int:
    """Submit one request every `every` steps, step until all are done; returns the number of steps."""
    steps = submitted = 0
    while submitted < len(requests) or engine.busy_rows or engine.queued:
        if submitted < len(requests) and steps % every == 0:
            assert engine.submit(requests[submitted])
            submitted += 1
        engine.step()
        steps += 1
    return steps


@pytest.mark.parametrize("max_batch,prefill_chunk,every", [(4, 16, 3), (8, 128, 1), (2, 7, 2)])
def test_each_request_equals_its_solo_generate_run(model, max_batch, prefill_chunk, every) -> None:
    engine = ContinuousEngine(model, STOP, max_batch=max_batch, max_queue=64, prefill_chunk=prefill_chunk)
    requests = _requests(12)
    _run(engine, requests, every)
    for r in requests:
        ids, stopped = generate_batch(model, [r.prompt_ids], r.max_new_tokens, r.params, STOP, r.seed)
        assert r.tokens == [t for t in ids[0] if t not in STOP]
        assert r.finish == ("stop" if stopped[0] else "length", len(r.tokens))
    assert {r.finish[0] for r in requests} == {"stop", "length"}  # both ways of ending were exercised


def test_a_short_request_joins_and_leaves_while_a_long_one_decodes(model) -> None:
    engine = ContinuousEngine(model, frozenset(), max_batch=4)
    long = Recorder([40, 41, 42], 200, SamplingParams(temperature=0))
    engine.submit(long)
    for _ in range(5):
        engine.step()
    short = Recorder([50, 51], 3, SamplingParams(temperature=0))
    engine.submit(short)
    engine.step()
    assert len(short.tokens) == 2  # its first token from the prefill, its second from the same step's decode
    engine.step()
    assert short.finish == ("length", 3) and long.finish is None and engine.busy_rows == 1
    assert len(long.tokens) == 8  # 7 steps: two tokens in the first (prefill + decode), then one per step


def test_a_long_prompt_prefills_in_chunks_while_running_rows_keep_decoding(model) -> None:
    engine = ContinuousEngine(model, frozenset(), max_batch=4, prefill_chunk=16)
    running = Recorder([40, 41], 100, SamplingParams(temperature=0))
    engine.submit(running)
    engine.step()
    long_prompt = Recorder(list(range(30, 130)), 5, SamplingParams(temperature=0))  # 100 tokens: 7 chunks of 16
    engine.submit(long_prompt)
    before = len(running.tokens)
    for step in range(1, 7):
        engine.step()
        assert len(running.tokens) == before + step and not long_prompt.tokens
    engine.step()
    assert long_prompt.tokens and len(running.tokens) == before + 7
    ids, _ = generate_batch(model, [long_prompt.prompt_ids], 1, SamplingParams(temperature=0))
    assert long_prompt.tokens[0] == ids[0][0]


def test_cancelled_and_stopped_rows_leave_at_the_next_step(model) -> None:
    engine = ContinuousEngine(model, frozenset(), max_batch=4)
    a, b = Recorder([40], 100), Recorder([41], 100, stop_after=3)
    engine.submit(a)
    engine.submit(b)
    engine.step()
    assert b.finish is None and engine.busy_rows == 2
    engine.step()
    assert b.finish == ("stop", 3) and engine.busy_rows == 1  # on_token said stop: gone in the same step
    a.cancelled, seen = True, len(a.tokens)
    engine.step()
    assert engine.busy_rows == 0 and len(a.tokens) == seen and a.finish is None  # no more tokens, nobody to tell


def test_a_full_queue_refuses_and_a_failing_step_answers_its_rows_then_the_engine_goes_on(model) -> None:
    engine = ContinuousEngine(model, frozenset(), max_batch=1, max_queue=1)
    assert engine.submit(Recorder([40], 5)) and not engine.submit(Recorder([41], 5))

    @dataclass(eq=False)
    class Broken(Recorder):
        def on_token(self, token: int, logprob: TokenLogprob | None) -> bool:
            raise RuntimeError("client code failed")

    engine = ContinuousEngine(model, frozenset(), max_batch=2)
    broken, fine = Broken([40], 5), Recorder([41], 4)
    engine.submit(broken)
    engine.step()
    assert broken.errors == ["RuntimeError: client code failed"] and engine.busy_rows == 0
    engine.submit(fine)
    for _ in range(4):
        engine.step()
    assert fine.finish == ("length", 4)


def test_logprobs_are_the_models_and_the_top_list_is_sorted(model) -> None:
    engine = ContinuousEngine(model, frozenset(), max_batch=2)
    greedy = Recorder([40, 41], 4, SamplingParams(temperature=0), n_logprobs=3)
    plain = Recorder([40, 41], 4, SamplingParams(temperature=0))
    _run(engine, [greedy, plain], 1)
    assert plain.logprobs == [None] * 4
    with torch.no_grad():
        logits = model(torch.tensor([greedy.prompt_ids]))[0, -1]
    first = greedy.logprobs[0]
    assert first.logprob == pytest.approx(float(logits.log_softmax(-1).max()), abs=1e-5)
    for lp, token in zip(greedy.logprobs, greedy.tokens):
        assert [t for t, _ in lp.top][0] == token and lp.logprob == pytest.approx(lp.top[0][1])  # greedy = top 1
        assert len(lp.top) == 3 and [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_decode_step_says_eager_compiled_or_why_compiling_failed(monkeypatch, model) -> None:
    from scratchllm.infer import slot_forward

    real_compile = torch.compile
    monkeypatch.setattr(slot_forward.torch, "compile",  # dynamo's eager backend: the tracing, not inductor's minutes
                        lambda fn, **kwargs: real_compile(fn, backend="eager", dynamic=True))
    assert ContinuousEngine(model, STOP, max_batch=2).decode_step == "eager"
    engine = ContinuousEngine(model, STOP, max_batch=2, compile=True)
    assert engine.forward.wait_compiled()
    assert engine.decode_step == "compiled"

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(slot_forward.torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="no C..? compiler"):
        engine = ContinuousEngine(model, STOP, max_batch=2, compile=True)
        engine.forward.wait_compiled()
    assert engine.decode_step == "eager (compile failed: RuntimeError: no C++ compiler)"
    requests = _requests(3)
    _run(engine, requests, every=1)
    assert all(r.finish is not None and not r.errors for r in requests)
