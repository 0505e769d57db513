"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP on loopback."""

from __future__ import annotations

import socket
import threading
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


def _serve(app) -> str:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def world():
    tok = Tokenizer.train(["hello world, the answer is 42. 你好世界 user assistant\n" * 30], 256 + 80 + 4, progress=False)
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    base = _serve(create_app(model, tok, "tiny", max_batch=8, max_queue=64))
    keyed = _serve(create_app(model, tok, "tiny", api_key="sekret"))
    return base, keyed


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


def test_32_concurrent_streams_equal_their_solo_runs(world) -> None:
    client = _client(world[0])

    def ask(i: int) -> str:
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"hello {i}"}],
                                                max_tokens=10, temperature=1.0, seed=i, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    alone = [ask(i) for i in (0, 7, 31)]
    assert [together[i] for i in (0, 7, 31)] == alone
    assert len(set(together)) > 1  # independent outputs, not one reply copied to everyone


def test_chat_page_served(world) -> None:
    page = httpx.get(world[0] + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def test_full_queue_answers_503_with_a_reason_while_good_and_bad_requests_keep_flowing(world) -> None:
    tok = Tokenizer.train(["hello world, the answer is 42.\n" * 30], 256 + 40 + 4, progress=False)
    torch.manual_seed(0)
    model = GPT(model_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    base = _serve(create_app(model, tok, "tiny", max_batch=1, max_queue=1))  # one decoding, one waiting
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}
    bad = {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}

    def send(i: int) -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", json=bad if i % 4 == 3 else good, timeout=120)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(12)))
    codes = [r.status_code for r in responses]
    assert all(codes[i] == 400 for i in range(3, 12, 4))  # bad requests are refused whatever the load
    good_codes = [c for i, c in enumerate(codes) if i % 4 != 3]
    assert 503 in good_codes and 200 in good_codes and set(good_codes) <= {200, 503}, codes
    assert all("queue is full" in r.json()["error"]["message"] for r in responses if r.status_code == 503)
    assert httpx.post(f"{base}/v1/chat/completions", json=good, timeout=120).status_code == 200  # still serving
