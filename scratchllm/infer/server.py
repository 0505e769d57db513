"""`scratchllm serve`: an OpenAI-compatible HTTP API (chat and text completions, SSE streaming) and a chat page.

Requests are validated by pydantic (4xx with a reason), queued (bounded: 503 when full) and decoded
together by one engine thread: each wave takes up to `max_batch` waiting requests and runs them as one
batch over the KV cache (dynamic batching). Every row samples from its own seeded generator, so a
request's text does not depend on its neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from scratchllm.infer.engine import generate
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import StreamDecoder, Tokenizer
from scratchllm.tokenizer.chat import ChatFormatError, render_for_completion, reply_stop_ids

STATIC = Path(__file__).parent / "static"


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingFields(BaseModel):
    model: str
    max_tokens: int = Field(default=128, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int | None
    stop: list[str]
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) … then ("done", reason)
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False


class BatchEngine:
    """One thread decodes every request: waits for work, batches what is queued, streams pieces back."""

    def __init__(self, model: GPT, tok: Tokenizer, max_batch: int = 8, max_queue: int = 64) -> None:
        self.model, self.tok, self.max_batch = model, tok, max_batch
        self.pending: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.busy_rows = 0
        threading.Thread(target=self._run, daemon=True, name="scratchllm-engine").start()

    def submit(self, job: Job) -> bool:
        try:
            self.pending.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _emit(self, job: Job, kind: str, value: Any) -> None:
        assert job.loop is not None
        job.loop.call_soon_threadsafe(job.tokens.put_nowait, (kind, value))

    def _run(self) -> None:
        while True:
            jobs = [self.pending.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            jobs = [j for j in jobs if not j.cancelled]
            if jobs:
                self.busy_rows = len(jobs)
                try:
                    self._wave(jobs)
                except Exception as err:  # a failed wave answers its requests; the server stays up
                    for job in jobs:
                        self._emit(job, "error", f"{type(err).__name__}: {err}")
                self.busy_rows = 0

    @torch.no_grad()
    def _wave(self, jobs: list[Job]) -> None:
        tok = self.tok
        decoders = [StreamDecoder(tok) for _ in jobs]
        texts = [""] * len(jobs)
        done = [False] * len(jobs)
        counts = [0] * len(jobs)
        stop_ids = reply_stop_ids(tok)
        steps = generate(self.model, [j.prompt_ids for j in jobs], max(j.max_new_tokens for j in jobs),
                         [j.params for j in jobs], stop_ids, [j.seed for j in jobs], tok.pad_id)
        for step in steps:
            for i, job in enumerate(jobs):
                if done[i] or not bool(step.active[i]):
                    continue
                if job.cancelled:  # the client went away: its row stops now
                    done[i] = True
                    continue
                token = int(step.tokens[i])
                if token in stop_ids:
                    done[i] = True
                    self._emit(job, "done", ("stop", counts[i]))
                    continue
                counts[i] += 1
                piece = decoders[i].push(token)
                texts[i] += piece
                hit = [s for s in job.stop if s and s in texts[i]]
                if hit:
                    cut = min(texts[i].index(s) for s in hit)
                    keep = piece[: max(0, len(piece) - (len(texts[i]) - cut))]
                    if keep:
                        self._emit(job, "text", keep)
                    done[i] = True
                    self._emit(job, "done", ("stop", counts[i]))
                    continue
                if piece:
                    self._emit(job, "text", piece)
                if counts[i] >= job.max_new_tokens:
                    done[i] = True
                    self._emit(job, "done", ("length", counts[i]))
            if all(done):
                break
        for i, job in enumerate(jobs):
            if not done[i]:
                tail = decoders[i].flush()
                if tail:
                    self._emit(job, "text", tail)
                self._emit(job, "done", ("length", counts[i]))


def create_app(model: GPT, tok: Tokenizer, model_name: str = "scratchllm", api_key: str | None = None,
               max_batch: int = 8, max_queue: int = 64):
    # subtle: FastAPI resolves these annotations by name at module level (this file uses postponed annotations)
    app = FastAPI(title="scratchllm", version="0.1.0")
    engine = BatchEngine(model.eval(), tok, max_batch, max_queue)
    app.state.engine = engine
    context = model.config.max_seq_len

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return error(400, f"invalid request: {details}")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given, f"Bearer {api_key}"):
                return error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": engine.pending.qsize(), "decoding": engine.busy_rows}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "scratchllm"}]}

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "chat.html")

    def make_jobs(req: SamplingFields, prompt_ids: list[int]) -> list[Job]:
        if req.model != model_name:
            raise HTTPException(404, f"unknown model {req.model!r}; this server serves {model_name!r}")
        if len(prompt_ids) + 1 > context:
            raise HTTPException(400, f"prompt is {len(prompt_ids)} tokens; the context holds {context} tokens")
        max_new = min(req.max_tokens, context - len(prompt_ids))
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, presence_penalty=req.presence_penalty,
                                frequency_penalty=req.frequency_penalty)
        loop = asyncio.get_running_loop()
        jobs = []
        for i in range(req.n):
            seed = None if req.seed is None else req.seed + i
            job = Job(prompt_ids, max_new, params, seed, stop, loop=loop)
            if not engine.submit(job):
                for queued in jobs:
                    queued.cancelled = True
                raise HTTPException(503, "the request queue is full; retry shortly")
            jobs.append(job)
        return jobs

    async def collect(job: Job) -> tuple[str, str, int]:
        text = ""
        while True:
            kind, value = await job.tokens.get()
            if kind == "text":
                text += value
            elif kind == "error":
                raise HTTPException(500, value)
            else:
                reason, count = value
                return text, reason, count

    async def respond(req: SamplingFields, prompt_ids: list[int], request: Request, chat: bool):
        jobs = make_jobs(req, prompt_ids)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not req.stream:
            results = await asyncio.gather(*(collect(j) for j in jobs))
            choices = []
            for i, (text, reason, _) in enumerate(results):
                body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                choices.append({"index": i, **body, "finish_reason": reason, "logprobs": None})
            completion = sum(c for _, _, c in results)
            return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                    "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                              "total_tokens": len(prompt_ids) + completion}}

        async def events():
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(i: int, delta: dict | str, reason: str | None) -> str:
                body = {"delta": delta} if chat else {"text": delta}
                payload = {"id": rid, "object": chunk_obj, "created": created, "model": model_name,
                           "choices": [{"index": i, **body, "finish_reason": reason, "logprobs": None}]}
                return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

            try:
                for i, job in enumerate(jobs):
                    if chat:
                        yield chunk(i, {"role": "assistant", "content": ""}, None)
                    while True:
                        if await request.is_disconnected():
                            raise asyncio.CancelledError
                        kind, value = await job.tokens.get()
                        if kind == "text":
                            yield chunk(i, {"content": value} if chat else value, None)
                        elif kind == "error":
                            yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                            break
                        else:
                            yield chunk(i, {} if chat else "", value[0])
                            break
                yield "data: [DONE]\n\n"
            finally:
                for job in jobs:  # a client that disconnects frees its rows at once
                    job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        try:
            prompt = render_for_completion(tok, [m.model_dump() for m in req.messages])
        except ChatFormatError as err:
            raise HTTPException(400, str(err)) from None
        return await respond(req, prompt, request, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if not req.prompt:
            raise HTTPException(400, "prompt must not be empty")
        return await respond(req, tok.encode(req.prompt), request, chat=False)

    return app


def main(argv: list[str]) -> int:
    from scratchllm.infer.generate_cli import add_inference_args, load_for_inference

    parser = argparse.ArgumentParser(prog="scratchllm serve", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--model-name", default="scratchllm")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together per wave")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    parser.add_argument("--device", default="cpu")
    add_inference_args(parser)
    args = parser.parse_args(argv)
    import uvicorn

    model, tok = load_for_inference(args.checkpoint, args.device, args.quantize, args.lora)
    app = create_app(model, tok, args.model_name, args.api_key, args.max_batch, args.max_queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
