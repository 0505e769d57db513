"""Serving throughput and latency: the server's dynamic batching vs the same model served one request at a time.

    python benchmarks/bench_server.py [--checkpoint runs/default/sft/final] [--clients 1 8 32] [--max-tokens 64]

Starts two `scratchllm serve` subprocesses on the same model: `--max-batch` = the most clients (batched) and
`--max-batch 1` (the reference: one request at a time), and loads them in turn at each client count. The clients
run in this process, so they never hold a server's GIL. Each of C clients sends `--requests` non-streaming
completions back to back; tokens/s = completion tokens (from `usage`) / wall time, latency = request sent ->
full reply received; p99 is nearest-rank, so with few requests it is the slowest one.

Without the checkpoint a random-init `mini` model is served: the API has no ignore-EOS switch, and such a model
rarely samples a stop token, so nearly every reply is the full `--max-tokens`. Seeds are fixed, so both servers
generate the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from scratchllm.config import model_preset
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.train.checkpoint import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["To be, or not to be", "The answer is", "Once upon a time", "What is two plus three?",
           "Shall I compare thee", "Hello, how are you?", "The king said", "Tell me a story about"]


def random_model_dir(directory: Path) -> Path:
    """A random-init `mini` model with the pipeline's tokenizer (or a throwaway one) saved as a model directory."""
    tok_path = ROOT / "runs/default/tokenizer/tokenizer.json"
    if tok_path.exists():
        tok = Tokenizer.load(tok_path)
    else:
        lines = (ROOT / "corpus/chat/sft_val.jsonl").read_text(encoding="utf-8").splitlines()
        tok = Tokenizer.train(lines, 1024, progress=False)
    torch.manual_seed(0)
    model = GPT(model_preset("mini", vocab_size=tok.vocab_size))
    return save_model(directory / "model", model, tok, {"note": "random init (bench_server.py)"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, max_batch: int, max_queue: int, log_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "scratchllm", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--model-name", "bench", "--max-batch", str(max_batch), "--max-queue", str(max_queue)]
    log = log_dir / f"server-{port}.log"  # a file, not a pipe: an unread pipe fills up and stalls the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            httpx.get(base + "/health", timeout=1).raise_for_status()
            return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not answer /health within 120 s")


async def load(base: str, n_clients: int, n_requests: int, max_tokens: int) -> dict[str, float]:
    """C closed-loop clients, each sending `n_requests` completions in a row."""
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient, c: int) -> None:
        nonlocal tokens
        for r in range(n_requests):
            body = {"model": "bench", "prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 1.0, "seed": c * 1000 + r}
            start = time.perf_counter()
            resp = await http.post(base + "/v1/completions", json=body)
            latencies.append(time.perf_counter() - start)
            resp.raise_for_status()
            tokens += resp.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=n_clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(n_clients)))
        wall = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:  # nearest rank
        return latencies[min(len(latencies) - 1, max(0, round(q * len(latencies)) - 1))]

    return {"tok_s": tokens / wall, "p50_s": pct(0.50), "p99_s": pct(0.99), "tokens": tokens,
            "requests": len(latencies), "wall_s": wall}


def report(name: str, c: int, r: dict[str, float]) -> None:
    print(f"  {name:<13} clients={c:2d}: {r['tok_s']:7.1f} tok/s  p50 {r['p50_s']:6.2f} s  p99 {r['p99_s']:6.2f} s  "
          f"({r['requests']} requests, {r['tokens']} tokens, {r['wall_s']:.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs/default/sft/final",
                        help="model directory to serve; a random-init mini model if it does not exist")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests per client, sent back to back")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint if (args.checkpoint / "config.json").exists() else random_model_dir(Path(tmp))
        model, tok, config = load_model(checkpoint)
        print(f"torch={torch.__version__} threads={os.environ.get('OMP_NUM_THREADS', 'default')} "
              f"cpus={os.cpu_count()} model={checkpoint} ({config.get('note', 'trained')}) "
              f"params={model.num_params() / 1e6:.2f}M vocab={tok.vocab_size} max_tokens={args.max_tokens} "
              f"requests/client={args.requests}", flush=True)
        del model
        # Both servers stay up; an idle one blocks on its queue. Alternating them per client count keeps the
        # comparison fair on a machine whose other load drifts during the run.
        servers: list[tuple[subprocess.Popen, str]] = []
        results: dict[str, dict[int, dict[str, float]]] = {"batched": {}, "one-at-a-time": {}}
        try:
            for max_batch in (max(args.clients), 1):
                servers.append(start_server(checkpoint, max_batch, 2 * max(args.clients), Path(tmp)))
            for _, base in servers:
                asyncio.run(load(base, 1, 1, 8))  # warm-up: first-call allocations, lazy imports
            for c in args.clients:
                for name, (_, base) in zip(results, servers):
                    results[name][c] = asyncio.run(load(base, c, args.requests, args.max_tokens))
                    report(name, c, results[name][c])
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait(timeout=30)

    print("\n| clients | batched tok/s | p50 s | p99 s | one-at-a-time tok/s | p50 s | p99 s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in args.clients:
        b, s = results["batched"][c], results["one-at-a-time"][c]
        print(f"| {c} | {b['tok_s']:.1f} | {b['p50_s']:.2f} | {b['p99_s']:.2f} | {s['tok_s']:.1f} | {s['p50_s']:.2f} "
              f"| {s['p99_s']:.2f} | {b['tok_s'] / s['tok_s']:.2f}x |")


if __name__ == "__main__":
    main()
