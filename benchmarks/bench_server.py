"""Serving latency and throughput: continuous batching (infer/continuous.py) vs the wave engine it replaced.

    python benchmarks/bench_server.py [--checkpoint runs/default/sft/final] [--threads 1] [--requests 16]
                                      [--rate 0.5] [--clients 32] [--max-batch 32]

Starts two `scratchllm serve`-equivalent subprocesses on the same model and the same API code, one per engine: the
continuous engine, and `WaveEngine` below (the server's engine up to e8494b0, kept here as the reference: it takes
whatever is queued, up to --max-batch, and decodes it as one batch until every row has ended; requests arriving
meanwhile wait for the next wave). The clients run in this process (asyncio + httpx), streaming, and each scenario
runs on both servers in turn:

1. short during long: time to first token (TTFT) of an 8-token request sent 1 s into a 500-token one, against its
   TTFT alone just before (median of 3 such pairs);
2. Poisson arrivals at --rate requests/s, 70% short (8-32 new tokens) and 30% long (256-512): TTFT p50/p99,
   inter-token latency (ITL) p99, tokens/s = completion tokens / wall time from the first send to the last token;
3. --clients closed-loop clients, each sending 2 requests of the same short/long mix back to back: tokens/s;
4. (continuous only) a 10 MB body while 8 streams run: its status and the largest gap between two chunks of any
   stream, beside the same 8 streams without it.

Percentiles are nearest-rank. Without the checkpoint a random-init `mini` model is served: such a model rarely
samples a stop token, so nearly every reply is its full max_tokens. Seeds are fixed: both servers generate the same
tokens for the same request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from scratchllm.config import model_preset
from scratchllm.infer.continuous import Request
from scratchllm.infer.engine import generate
from scratchllm.model.gpt import GPT
from scratchllm.model.io import load_model, save_model
from scratchllm.tokenizer.bpe import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ["short_during_long", "poisson", "closed_loop", "big_body"]
PROMPTS = ["To be, or not to be", "The answer is", "Once upon a time", "What is two plus three?",
           "Shall I compare thee", "Hello, how are you?", "The king said", "Tell me a story about"]


class WaveEngine:
    """The reference: static batching per wave (the server's engine at e8494b0, on the new Request interface)."""

    def __init__(self, model: GPT, stop_ids: frozenset[int], max_batch: int, max_queue: int) -> None:
        self.model, self.stop_ids, self.max_batch = model, stop_ids, max_batch
        self.pending: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.busy_rows = 0

    @property
    def queued(self) -> int:
        return self.pending.qsize()

    def submit(self, request: Request) -> bool:
        try:
            self.pending.put_nowait(request)
            return True
        except queue.Full:
            return False

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="wave-engine").start()

    def _run(self) -> None:
        while True:
            wave = [self.pending.get()]
            while len(wave) < self.max_batch:
                try:
                    wave.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            wave = [r for r in wave if not r.cancelled]
            if wave:
                self.busy_rows = len(wave)
                try:
                    self._wave(wave)
                except Exception as err:  # noqa: BLE001 - as the old server: the wave's requests get the error
                    for r in wave:
                        r.on_error(f"{type(err).__name__}: {err}")
                self.busy_rows = 0

    @torch.no_grad()
    def _wave(self, wave: list[Request]) -> None:
        done, counts = [False] * len(wave), [0] * len(wave)
        steps = generate(self.model, [r.prompt_ids for r in wave], max(r.max_new_tokens for r in wave),
                         [r.params for r in wave], self.stop_ids, [r.seed for r in wave], 0)
        for step in steps:
            for i, r in enumerate(wave):
                if done[i] or not bool(step.active[i]):
                    continue
                token = int(step.tokens[i])
                if r.cancelled or token in self.stop_ids:
                    done[i] = True
                    if not r.cancelled:
                        r.on_finish("stop", counts[i])
                    continue
                counts[i] += 1
                if r.on_token(token, None):
                    done[i] = True
                    r.on_finish("stop", counts[i])
                elif counts[i] >= r.max_new_tokens:
                    done[i] = True
                    r.on_finish("length", counts[i])
            if all(done):
                break
        for i, r in enumerate(wave):
            if not done[i]:
                r.on_finish("length", counts[i])


def serve(args: argparse.Namespace) -> None:
    """Child process: one server on one engine."""
    import uvicorn

    from scratchllm.infer.server import create_app
    from scratchllm.tokenizer.chat import reply_stop_ids

    torch.set_num_threads(args.threads)
    model, tok, _ = load_model(args.checkpoint)
    model.eval()
    engine = None
    if args.serve == "wave":
        engine = WaveEngine(model, reply_stop_ids(tok), args.max_batch, 4 * args.clients)
    app = create_app(model, tok, "bench", max_batch=args.max_batch, max_queue=4 * args.clients, engine=engine)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def random_model_dir(directory: Path, preset: str) -> Path:
    """A random-init `preset` model with the pipeline's tokenizer (or a throwaway one) saved as a model directory."""
    tok_path = ROOT / "runs/default/tokenizer/tokenizer.json"
    if tok_path.exists():
        tok = Tokenizer.load(tok_path)
    else:
        lines = (ROOT / "corpus/chat/sft_val.jsonl").read_text(encoding="utf-8").splitlines()
        tok = Tokenizer.train(lines, 1024, progress=False)
    torch.manual_seed(0)
    model = GPT(model_preset(preset, vocab_size=tok.vocab_size, max_seq_len=512))
    return save_model(directory / "model", model, tok, {"note": "random init (bench_server.py)"})


def start_server(args: argparse.Namespace, engine: str, checkpoint: Path, log_dir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", engine, "--port", str(port), "--checkpoint", str(checkpoint),
           "--threads", str(args.threads), "--max-batch", str(args.max_batch), "--clients", str(args.clients)]
    log = log_dir / f"server-{engine}.log"  # a file, not a pipe: an unread pipe fills up and stalls the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            httpx.get(base + "/health", timeout=1).raise_for_status()
            return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not answer /health within 180 s")


async def stream_one(http: httpx.AsyncClient, base: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """One streamed completion: TTFT, the gaps between its chunks, its token count."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with http.stream("POST", base + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data["choices"] and data["choices"][0]["text"]:
                now = time.perf_counter()
                if first is None:
                    first = now - start
                else:
                    gaps.append(now - last)
                last = now
    return {"ttft": first if first is not None else time.perf_counter() - start, "gaps": gaps, "tokens": tokens}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))] if values else float("nan")


def mix(rng: random.Random) -> int:
    return rng.randint(8, 32) if rng.random() < 0.7 else rng.randint(256, 512)


async def short_during_long(base: str, trials: int = 3) -> dict:
    """Median over `trials` of: an 8-token request's TTFT alone, then its TTFT sent 1 s into a 500-token request
    (which is then dropped: hanging up frees its row, so trials do not pile up)."""
    alone, during, ratios = [], [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800)) as http:
        for trial in range(trials):
            alone.append((await stream_one(http, base, "The answer is", 8, trial))["ttft"])
            long = asyncio.create_task(stream_one(http, base, "Once upon a time", 500, 7 + trial))
            await asyncio.sleep(1.0)
            during.append((await stream_one(http, base, "The answer is", 8, trial))["ttft"])
            ratios.append(during[-1] / alone[-1])
            long.cancel()
            await asyncio.gather(long, return_exceptions=True)
    return {"alone": pct(alone, 0.5), "during": pct(during, 0.5), "ratio": pct(ratios, 0.5)}


async def poisson(base: str, n: int, rate: float) -> dict:
    rng = random.Random(0)
    plan = [(rng.expovariate(rate), PROMPTS[i % len(PROMPTS)], mix(rng), i) for i in range(n)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=httpx.Limits(max_connections=n + 4)) as http:
        start = time.perf_counter()
        tasks = []
        for wait, prompt, max_tokens, seed in plan:
            await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(stream_one(http, base, prompt, max_tokens, seed)))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "itl_p99": pct(gaps, 0.99),
            "tok_s": tokens / wall, "tokens": tokens, "wall": wall}


async def closed_loop(base: str, n_clients: int) -> dict:
    async def client(http: httpx.AsyncClient, c: int) -> int:
        rng, tokens = random.Random(c), 0
        for r in range(2):
            tokens += (await stream_one(http, base, PROMPTS[(c + r) % len(PROMPTS)], mix(rng), c * 10 + r))["tokens"]
        return tokens

    limits = httpx.Limits(max_connections=n_clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as http:
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(client(http, c) for c in range(n_clients))))
        wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "tokens": tokens, "wall": wall}


async def closed_loop_warmup(base: str) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800)) as http:
        await asyncio.gather(*(stream_one(http, base, PROMPTS[i], 16, i) for i in range(4)))


async def big_body_during_streams(base: str) -> dict:
    """The largest gap between two chunks of 8 streams, with a 10 MB body sent 1 s in, and without it (the control:
    on a loaded host a step alone can stall that long)."""
    async def streams(big: bytes | None) -> tuple[float, int | None]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(1800)) as http:
            running = [asyncio.create_task(stream_one(http, base, PROMPTS[i], 64, i)) for i in range(8)]
            status = None
            if big is not None:
                await asyncio.sleep(1.0)
                resp = await http.post(base + "/v1/completions", content=big,
                                       headers={"content-type": "application/json"})
                status = resp.status_code
            results = await asyncio.gather(*running)
        return max(g for r in results for g in r["gaps"]), status

    control, _ = await streams(None)
    max_gap, status = await streams(json.dumps({"model": "bench", "prompt": "x" * 10_000_000}).encode())
    return {"status": status, "max_gap": max_gap, "control_max_gap": control}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs/default/sft/final",
                        help="model directory to serve; a random-init mini model if it does not exist")
    parser.add_argument("--preset", default="mini", help="the random-init model's preset, without a checkpoint")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--requests", type=int, default=16, help="requests in the Poisson scenario")
    parser.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals per second")
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--max-batch", type=int, default=32, help="rows per batch, both engines")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=SCENARIOS)
    parser.add_argument("--serve", choices=["continuous", "wave"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint if (args.checkpoint / "config.json").exists() else random_model_dir(Path(tmp), args.preset)
        model, tok, config = load_model(checkpoint)
        print(f"torch={torch.__version__} threads/server={args.threads} cpus={os.cpu_count()} model={checkpoint} "
              f"({config.get('note', 'trained')}) params={model.num_params() / 1e6:.2f}M vocab={tok.vocab_size} "
              f"max_batch={args.max_batch}", flush=True)
        del model
        servers = {}
        results: dict[str, dict[str, dict]] = {"continuous": {}, "wave": {}}
        try:
            for name in results:
                servers[name] = start_server(args, name, checkpoint, Path(tmp))
            for _, base in servers.values():  # warm-up: first-call allocations, lazy imports
                asyncio.run(closed_loop_warmup(base))
            scenarios = [("short_during_long", lambda b: short_during_long(b)),
                         ("poisson", lambda b: poisson(b, args.requests, args.rate)),
                         ("closed_loop", lambda b: closed_loop(b, args.clients))]
            scenarios = [(name, run) for name, run in scenarios if name in args.scenarios]
            for scenario, run in scenarios:  # both servers per scenario: a drifting host load hits both alike
                for name, (_, base) in servers.items():
                    results[name][scenario] = asyncio.run(run(base))
                    print(f"  {name:<10} {scenario:<17} "
                          + "  ".join(f"{k}={v:.3f}" for k, v in results[name][scenario].items()), flush=True)
            if "big_body" in args.scenarios:
                big = asyncio.run(big_body_during_streams(servers["continuous"][1]))
                print(f"  continuous 10 MB body during 8 streams: status {big['status']}, largest gap between "
                      f"chunks {big['max_gap']:.3f} s (without the body: {big['control_max_gap']:.3f} s)", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)

    if set(SCENARIOS) - set(args.scenarios):
        return  # the table needs every scenario; the lines above have the rest
    c, w = results["continuous"], results["wave"]
    print("\n| | continuous | wave (reference) | ratio |")
    print("|---|---:|---:|---:|")
    sc, sw = c["short_during_long"], w["short_during_long"]
    print(f"| short request sent during a long one: TTFT s | {sc['during']:.3f} | {sw['during']:.3f} | "
          f"{sw['during'] / sc['during']:.1f}x lower |")
    print(f"| ... its TTFT alone s (median ratio during / alone) | {sc['alone']:.3f} ({sc['ratio']:.1f}x) | "
          f"{sw['alone']:.3f} ({sw['ratio']:.1f}x) | |")
    for key, label in (("ttft_p50", "Poisson TTFT p50 s"), ("ttft_p99", "Poisson TTFT p99 s"),
                       ("itl_p99", "Poisson ITL p99 s")):
        print(f"| {label} | {c['poisson'][key]:.3f} | {w['poisson'][key]:.3f} | "
              f"{w['poisson'][key] / c['poisson'][key]:.2f}x lower |")
    print(f"| Poisson tokens/s | {c['poisson']['tok_s']:.1f} | {w['poisson']['tok_s']:.1f} | "
          f"{c['poisson']['tok_s'] / w['poisson']['tok_s']:.2f}x higher |")
    print(f"| {args.clients} closed-loop clients tokens/s | {c['closed_loop']['tok_s']:.1f} | "
          f"{w['closed_loop']['tok_s']:.1f} | {c['closed_loop']['tok_s'] / w['closed_loop']['tok_s']:.2f}x higher |")


if __name__ == "__main__":
    main()
