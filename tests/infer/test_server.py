"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP on loopback."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from scratchllm.config import model_preset
from scratchllm.infer.server import create_app
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def world(serve, chat_tokenizer):
    tok = chat_tokenizer
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    base = serve(create_app(model, tok, "tiny", max_batch=8, max_queue=64))
    keyed = serve(create_app(model, tok, "tiny", api_key="sekret"))
    return base, keyed


@pytest.fixture(scope="module")
def paced(serve, chat_tokenizer):
    """A tiny model slowed to ~10 ms per forward, like a real one, so that replies take seconds."""
    tok = chat_tokenizer
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512)).eval()
    model.embed_tokens.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    return serve(create_app(model, tok, "tiny", max_batch=16, max_queue=64))


def _client(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def test_chat_completion_stream_and_not(world) -> None:
    client = _client(world[0])
    messages = [{"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens >= 1
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == full.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_text_completion_n_and_seed(world) -> None:
    client = _client(world[0])
    a = client.completions.create(model="tiny", prompt="hello", max_tokens=8, seed=3, n=2, temperature=1.0)
    b = client.completions.create(model="tiny", prompt="hello", max_tokens=8, seed=3, n=2, temperature=1.0)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2


def test_bad_requests_get_4xx_with_reasons_and_server_stays_up(world) -> None:
    base = world[0]
    r = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid request" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "hello " * 400})
    assert r.status_code == 400 and "context holds 128" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                         "max_tokens": 0})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_api_key(world) -> None:
    keyed = world[1]
    with pytest.raises(openai.AuthenticationError):
        _client(keyed, "wrong").models.list()
    assert _client(keyed, "sekret").models.list().data[0].id == "tiny"


def test_32_concurrent_streams_among_16_bad_requests_equal_their_solo_runs(world) -> None:
    base = world[0]
    client = _client(base)
    bad_bodies = [{"model": "tiny"}, {"model": "tiny", "messages": []}, {"model": "tiny", "messages": "hi"},
                  {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
                  {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 99},
                  {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
                  {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": 3},
                  {"model": "tiny", "messages": [{"role": "user", "content": "x" * 100_000}]}]

    def ask(i: int) -> str | int:
        if i % 3 == 2:  # 16 bad requests interleaved with the 32 good ones
            return httpx.post(f"{base}/v1/chat/completions", json=bad_bodies[i % len(bad_bodies)], timeout=60).status_code
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"hello {i}"}],
                                                max_tokens=10 + i % 20, temperature=1.0, seed=i, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(48) as pool:
        together = list(pool.map(ask, range(48)))
    good = {i: t for i, t in enumerate(together) if i % 3 != 2}
    assert len(good) == 32 and all(400 <= together[i] < 500 for i in range(2, 48, 3)), together
    assert {i: ask(i) for i in good} == good  # each equals its solo run
    assert len(set(good.values())) > 1  # independent outputs, not one reply copied to everyone
    assert httpx.get(f"{base}/health").json() == {"status": "ok", "queued": 0, "decoding": 0, "decode_step": "eager"}


def test_chat_page_served(world) -> None:
    page = httpx.get(world[0] + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_full_queue_answers_429_with_retry_after_while_good_and_bad_requests_keep_flowing(world, serve) -> None:
    tok = Tokenizer.train(["hello world, the answer is 42.\n" * 30], 256 + 40 + 4, progress=False)
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    base = serve(create_app(model, tok, "tiny", max_batch=1, max_queue=1))  # one decoding, one waiting
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
    bad = {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}

    def send(i: int) -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", json=bad if i % 4 == 3 else good, timeout=120)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(12)))
    codes = [r.status_code for r in responses]
    assert all(codes[i] == 400 for i in range(3, 12, 4))  # bad requests are refused whatever the load
    good_codes = [c for i, c in enumerate(codes) if i % 4 != 3]
    assert 429 in good_codes and 200 in good_codes and set(good_codes) <= {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            assert "queue is full" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
    assert httpx.post(f"{base}/v1/chat/completions", json=good, timeout=120).status_code == 200  # still serving


def test_every_error_uses_the_openai_envelope(world) -> None:
    base = world[0]
    answers = [
        (httpx.get(f"{base}/v1/nowhere"), 404),
        (httpx.get(f"{base}/v1/chat/completions"), 405),
        (httpx.post(f"{base}/v1/completions", content=b'{"model": "tiny", "prompt": "\xff\xfe"}',
                    headers={"content-type": "application/json"}), 400),
        (httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                          "top_logprobs": 2}), 400),
    ]
    for response, status in answers:
        body = response.json()
        assert response.status_code == status and set(body) == {"error"}, body
        assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error"


def test_stop_strings_never_leak_streaming_or_not(world) -> None:
    """The stop string spans a token boundary: the old server cut only the last token's share of it."""
    client = _client(world[0])
    ask = {"model": "tiny", "prompt": "hello", "max_tokens": 40, "temperature": 1.0, "seed": 5}
    full = client.completions.create(**ask, logprobs=0)
    tokens, text = full.choices[0].logprobs.tokens, full.choices[0].text
    boundary = next(i for i in range(3, len(tokens) - 1) if tokens[i].strip() and tokens[i + 1].strip())
    stop = tokens[boundary][-2:] + tokens[boundary + 1][:2]
    expected = text[: text.index(stop)]
    cut = client.completions.create(**ask, stop=[stop])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**ask, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_include_usage_max_completion_tokens_and_logprobs(world) -> None:
    client = _client(world[0])
    messages = [{"role": "user", "content": "hello"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3)
    assert full.usage.completion_tokens <= 6
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) and entry.logprob <= 0
    assert b"".join(bytes(e.bytes) for e in content).decode() == full.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content
    legacy = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == legacy.usage.completion_tokens
    assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0


def test_body_limit_413_before_reading_and_the_streams_keep_flowing(paced) -> None:
    """A 10 MB body while 8 streams run: 413 from its Content-Length alone (and for a chunked body once the limit
    is passed); the streams never stall. The old server tokenized it on the event loop for seconds."""
    base = paced
    gaps: list[float] = []

    def stream(i: int) -> str:
        body = {"model": "tiny", "prompt": f"hello {i}", "max_tokens": 60, "temperature": 1.0, "seed": i, "stream": True}
        last, text = None, ""
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                now = time.perf_counter()
                if line.startswith("data: {"):
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    big = json.dumps({"model": "tiny", "prompt": "x" * 10_000_000}).encode()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream, i) for i in range(8)]
        time.sleep(0.3)
        sized = httpx.post(f"{base}/v1/completions", content=big, headers={"content-type": "application/json"},
                           timeout=60)

        def chunked():
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]

        streamed = httpx.post(f"{base}/v1/completions", content=chunked(), timeout=60,
                              headers={"content-type": "application/json"})
        near_limit = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "hello " * 150_000},
                                timeout=60)  # under the body limit, far over the context: 400 untokenized
        texts = [f.result() for f in futures]
    assert sized.status_code == 413 and "byte limit" in sized.json()["error"]["message"]
    assert streamed.status_code == 413
    assert near_limit.status_code == 400 and "context holds" in near_limit.json()["error"]["message"]
    # subtle: 2 s, not the 0.5 s of the acceptance figure (docs/benchmarks.md): on a 2-core host shared with training
    # runs a step alone can take 0.8 s; the old server stalled every stream for the 8+ s it spent tokenizing.
    assert all(texts) and len(gaps) > 100 and max(gaps) < 2.0, max(gaps)
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_a_client_that_hangs_up_frees_its_row_streaming_or_not(paced) -> None:
    base = paced
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 400, "temperature": 0}  # greedy: never a stop id
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up after 0.5 s and closes
        httpx.post(f"{base}/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 1.0
    while httpx.get(f"{base}/health").json()["decoding"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.get(f"{base}/health").json()["decoding"] == 0  # 400 tokens would take 4+ s
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=10) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 1.0
    while httpx.get(f"{base}/health").json()["decoding"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.get(f"{base}/health").json()["decoding"] == 0
