"""Sampling filters keep exactly the right support; batched generation equals generating alone."""

from __future__ import annotations

import math

import pytest
import torch

from scratchllm.config import model_preset
from scratchllm.infer.engine import generate_batch
from scratchllm.infer.sampling import (
    SamplingParams,
    apply_presence_frequency,
    apply_repetition_penalty,
    min_p_filter,
    process_logits,
    sample,
    sample_from_uniforms,
    top_k_filter,
    top_p_filter,
)
from scratchllm.model.gpt import GPT

PROBS = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
LOGITS = PROBS.log()


def _support(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_support() -> None:
    assert _support(top_k_filter(LOGITS, 2)) == [0, 1]
    assert _support(top_k_filter(LOGITS, 0)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("p", "expected"), [(0.5, [0]), (0.6, [0, 1]), (0.75, [0, 1]), (0.76, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4])])
def test_top_p_support(p: float, expected: list[int]) -> None:
    assert _support(top_p_filter(LOGITS, p)) == expected


def test_min_p_support() -> None:
    assert _support(min_p_filter(LOGITS, 0.3)) == [0, 1, 2]  # keep p >= 0.15
    assert _support(min_p_filter(LOGITS, 0.5)) == [0, 1]


def test_penalties() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    counts = torch.tensor([[1.0, 2.0, 0.0]])
    assert torch.allclose(apply_repetition_penalty(logits, counts, 2.0), torch.tensor([[1.0, -4.0, 1.0]]))
    assert torch.allclose(apply_presence_frequency(logits, counts, 0.5, 0.25), torch.tensor([[1.25, -3.0, 1.0]]))


def test_low_temperature_equals_greedy_and_seed_reproduces() -> None:
    logits = torch.randn(4, 30)
    counts = torch.zeros(4, 30)
    greedy = sample(process_logits(logits, counts, SamplingParams(temperature=0)), SamplingParams(temperature=0))
    cold = SamplingParams(temperature=1e-4)
    assert torch.equal(sample(process_logits(logits, counts, cold), cold), greedy)
    warm = SamplingParams(temperature=1.0)
    a = sample(logits, warm, torch.Generator().manual_seed(3))
    b = sample(logits, warm, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_inverse_cdf_sampling_draws_each_token_at_its_probability() -> None:
    logits = top_k_filter(LOGITS, 4)  # token 4 now has probability 0
    probs = logits.softmax(-1)[0]
    n = 200_000
    drawn = sample_from_uniforms(logits.expand(n, -1), torch.rand(n, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(drawn, minlength=5).double() / n
    assert freq[4] == 0
    assert torch.allclose(freq, probs.double(), atol=4 * math.sqrt(0.25 / n))  # 4 standard errors at worst
    # The extremes land on the first and last token that has probability (1.0 itself: a u rounded up).
    edges = sample_from_uniforms(logits.expand(2, -1), torch.tensor([0.0, 1.0]))
    assert edges.tolist() == [0, 3]


def test_invalid_params_rejected() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(model_preset("tiny", vocab_size=60)).eval()


def test_batched_generation_equals_alone(model: GPT) -> None:
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    greedy = SamplingParams(temperature=0)
    batch, _ = generate_batch(model, prompts, 12, greedy)
    alone = [generate_batch(model, [p], 12, greedy)[0][0] for p in prompts]
    assert batch == alone


def test_stop_ids_and_seeded_sampling(model: GPT) -> None:
    out, stopped = generate_batch(model, [[1, 2]], 30, SamplingParams(temperature=0))
    first = out[0][3]
    out, stopped = generate_batch(model, [[1, 2]], 30, SamplingParams(temperature=0), stop_ids={first})
    assert out[0][-1] == first and stopped == [True] and len(out[0]) <= 4
    a, _ = generate_batch(model, [[1, 2], [3]], 15, SamplingParams(temperature=1.0), seed=7)
    b, _ = generate_batch(model, [[1, 2], [3]], 15, SamplingParams(temperature=1.0), seed=7)
    assert a == b
    # Row r samples with seed 7 + r whatever else is in the batch: row 1 here equals row 0 of a batch seeded 8.
    alone, _ = generate_batch(model, [[3]], 15, SamplingParams(temperature=1.0), seed=8)
    assert a[1] == alone[0]


def test_finished_rows_leave_the_batch_without_changing_any_row(model: GPT) -> None:
    """Rows that stop early are dropped from the cache; every row still equals that prompt generated alone,
    under shared and under per-row settings (the server's path)."""
    prompts = [[1 + i, 2 + 2 * i, 3][: 1 + i % 3] for i in range(8)]  # left padding too
    stop = set(range(0, 60, 6))  # a tenth of the vocabulary: rows stop at scattered steps
    shapes: list[int] = []
    hook = model.register_forward_hook(lambda _m, args, _out: shapes.append(args[0].shape[0]))
    try:
        batch, stopped = generate_batch(model, prompts, 20, SamplingParams(temperature=1.0), stop, seed=3)
    finally:
        hook.remove()
    assert 0 < sum(stopped) < len(prompts) or len({len(r) for r in batch}) > 1  # rows end at different steps
    assert min(shapes) < len(prompts)  # later steps ran on fewer rows
    for r, prompt in enumerate(prompts):
        alone, alone_stopped = generate_batch(model, [prompt], 20, SamplingParams(temperature=1.0), stop, seed=3 + r)
        assert (batch[r], stopped[r]) == (alone[0], alone_stopped[0])
    mixed = [SamplingParams(temperature=0.0 if r % 2 else 1.0) for r in range(len(prompts))]
    per_row, _ = generate_batch(model, prompts, 20, mixed, stop, seed=[10 + r for r in range(len(prompts))])
    for r, prompt in enumerate(prompts):
        assert per_row[r] == generate_batch(model, [prompt], 20, mixed[r], stop, seed=10 + r)[0][0]


def test_kv_cache_makes_generation_match_recompute(model: GPT) -> None:
    prompt = [5, 6, 7]
    out, _ = generate_batch(model, [prompt], 10, SamplingParams(temperature=0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out[0] == ids[len(prompt) :]
    assert math.isfinite(float(model(torch.tensor([ids])).sum()))


class StartsANewTurn(GPT):
    """A GPT that always picks <|im_start|> next: a chat model that begins another turn instead of closing its own."""

    def forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.config.vocab_size)
        logits[..., self.next_id] = 100.0  # certain under any sampling settings
        return logits


def test_chat_replies_stop_when_the_model_starts_a_new_turn() -> None:
    import argparse
    import io

    from fastapi.testclient import TestClient

    from scratchllm.eval.chat_eval import generate_replies
    from scratchllm.infer.generate_cli import add_sampling_args, stream_text
    from scratchllm.infer.server import create_app
    from scratchllm.tokenizer.bpe import Tokenizer
    from scratchllm.tokenizer.chat import render_for_completion

    tok = Tokenizer.train(["hello there, general kenobi " * 20], 256 + 20 + 4, progress=False)
    model = StartsANewTurn(model_preset("tiny", vocab_size=tok.vocab_size)).eval()
    model.next_id = tok.im_start_id
    messages = [{"role": "user", "content": "hello"}]
    assert generate_replies(model, tok, [messages], max_new_tokens=8) == [("", False)]  # stopped, but not ended
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    assert stream_text(model, tok, render_for_completion(tok, messages), parser.parse_args([]), io.StringIO()) == ""
    reply = TestClient(create_app(model, tok, "tiny")).post(
        "/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 8}).json()
    assert reply["choices"][0]["message"]["content"] == "" and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == 0
