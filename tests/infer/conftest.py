"""What the server tests share: serving an app over real HTTP on loopback, and the tiny tokenizer they chat with."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from scratchllm.tokenizer.bpe import Tokenizer


@pytest.fixture(scope="session")
def serve() -> Iterator[Callable[[object], str]]:
    """`serve(app)` starts uvicorn on a free loopback port in a thread and returns its base URL once /health
    answers; every server started this way is stopped when the session ends."""
    import uvicorn

    servers: list[uvicorn.Server] = []

    def start(app) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        servers.append(server)
        threading.Thread(target=server.run, daemon=True).start()
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                return f"http://127.0.0.1:{port}"
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    yield start
    for server in servers:
        server.should_exit = True


@pytest.fixture(scope="session")
def chat_tokenizer() -> Tokenizer:
    """A tokenizer trained in-process on one line of English, Chinese and the chat roles."""
    return Tokenizer.train(["hello world, the answer is 42. 你好世界 user assistant\n" * 30], 256 + 80 + 4, progress=False)
