"""`scratchllm serve`: an OpenAI-compatible HTTP API (chat and text completions, SSE streaming) and a chat page.

Requests are validated by pydantic (4xx with a reason, always in OpenAI's `{"error": {...}}` envelope), tokenized
off the event loop, queued (bounded: 429 with Retry-After when full) and decoded by one engine thread with
continuous batching (infer/continuous.py): a request joins the running batch at the next step and leaves as soon
as it ends. Every row samples from its own seeded generator, so a request's text does not depend on its
neighbours. Text reaches the client through infer/reply_text.py, which holds back possible stop strings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from scratchllm.infer.continuous import ContinuousEngine, TokenLogprob
from scratchllm.infer.continuous import Request as EngineRequest
from scratchllm.infer.reply_text import ReplyText, TokenEntry
from scratchllm.infer.sampling import SamplingParams
from scratchllm.model.gpt import GPT
from scratchllm.tokenizer.bpe import Tokenizer
from scratchllm.tokenizer.chat import ChatFormatError, render_for_completion, reply_stop_ids

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 128  # OpenAI's default is "up to the context"; a bounded default keeps a shared server fair
RETRY_AFTER_S = 1  # a full queue drains by whole replies; a second is a short, honest wait for a tiny model


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None)
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=5)  # the legacy API: how many alternatives per token


@dataclass(eq=False)
class Job(EngineRequest):
    """One choice of one request: the engine thread pushes ids, this turns them into events on the request's
    asyncio queue: (index, "text", text, entries), (index, "done", reason, n_tokens), (index, "error", message)."""

    index: int = 0
    events: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    reply: ReplyText | None = None
    stopped: bool = False

    def _emit(self, *event: Any) -> None:
        assert self.loop is not None and self.events is not None
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, *event))

    def on_token(self, token: int, logprob: TokenLogprob | None) -> bool:
        assert self.reply is not None
        text, entries, self.stopped = self.reply.push(token, logprob)
        if text or entries:
            self._emit("text", text, entries)
        return self.stopped

    def on_finish(self, reason: str, n_tokens: int) -> None:
        assert self.reply is not None
        if not self.stopped:  # after a stop string nothing more is shown
            text, entries = self.reply.flush()
            if text or entries:
                self._emit("text", text, entries)
        self._emit("done", reason, n_tokens)

    def on_error(self, message: str) -> None:
        self._emit("error", message)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, kind), headers=headers)


class Guard:
    """ASGI middleware in front of everything: the API key on /v1/*, and the body-size limit, checked on the
    Content-Length header before a byte of the body is read and again while a chunked body streams in.

    Pure ASGI rather than FastAPI's `@app.middleware("http")`: that wrapper buffers streaming responses and hides
    client disconnects from the endpoint."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1/"):
            if not secrets.compare_digest(headers.get("authorization", ""), f"Bearer {self.api_key}"):
                return await error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                            "authentication_error")(scope, receive, send)
        too_big = f"request body over the {self.max_body_bytes}-byte limit (--max-body-bytes)"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await error_response(413, too_big)(scope, receive, send)
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:  # a chunked body has no Content-Length to check up front
                    raise HTTPException(413, too_big)
            return message

        return await self.app(scope, counted_receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON error body: 400 for an invalid request, the route's own 4xx, 500 with the reason."""

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return error_response(400, f"invalid request: {details}")

    @app.exception_handler(StarletteHTTPException)  # also FastAPI's own 404 / 405 / unparsable-body errors
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif message == "There was an error parsing the body":
            message = "the body is not valid JSON in UTF-8"
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return error_response(exc.status_code, message, kind, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"{type(exc).__name__}: {exc}", "server_error")


@dataclass
class Served:
    """What the completion routes share: the engine, the tokenizer, the served model's name and context."""

    engine: Any
    tok: Tokenizer
    model_name: str
    context: int
    # A token is at most this many bytes, so a text of more than context * this many bytes cannot fit: it is
    # refused before the (slow, pure-Python) tokenizer sees it.
    max_token_bytes: int

    def check_fits(self, n_bytes: int) -> None:
        if n_bytes > self.context * self.max_token_bytes:
            raise HTTPException(400, f"prompt is at least {n_bytes // self.max_token_bytes} tokens; "
                                     f"the context holds {self.context} tokens")

    def submit(self, req: ChatRequest | CompletionRequest, prompt_ids: list[int], n_logprobs: int | None,
               events: asyncio.Queue) -> list[Job]:
        """One engine job per choice (`n`); 429 with Retry-After, and none of them kept, when the queue is full."""
        if len(prompt_ids) + 1 > self.context:
            raise HTTPException(400, f"prompt is {len(prompt_ids)} tokens; the context holds {self.context} tokens")
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens or DEFAULT_MAX_TOKENS
        max_new = min(asked, self.context - len(prompt_ids))
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, presence_penalty=req.presence_penalty,
                                frequency_penalty=req.frequency_penalty)
        loop = asyncio.get_running_loop()
        jobs: list[Job] = []
        for i in range(req.n):
            seed = None if req.seed is None else req.seed + i
            job = Job(prompt_ids, max_new, params, seed, n_logprobs, index=i, events=events, loop=loop,
                      reply=ReplyText(self.tok, stop))
            if not self.engine.submit(job):
                for queued in jobs:
                    queued.cancelled = True
                raise HTTPException(429, "the request queue is full; retry shortly",
                                    headers={"Retry-After": str(RETRY_AFTER_S)})
            jobs.append(job)
        return jobs

    def chat_logprobs(self, entries: list[TokenEntry]) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            raw = self.tok.token_bytes(token)
            return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

        return {"content": [{**one(e.token, e.logprob.logprob), "top_logprobs": [one(t, lp) for t, lp in e.logprob.top]}
                            for e in entries if e.logprob is not None]}

    def completion_logprobs(self, entries: list[TokenEntry], offset: int) -> dict[str, Any]:
        def text(token: int) -> str:
            return self.tok.token_bytes(token).decode("utf-8", "replace")

        scored = [e for e in entries if e.logprob is not None]
        return {"tokens": [text(e.token) for e in scored], "token_logprobs": [e.logprob.logprob for e in scored],
                "top_logprobs": [{text(t): lp for t, lp in e.logprob.top} for e in scored],
                "text_offset": [offset + e.start for e in scored]}


async def watch_disconnect(request: Request, jobs: list[Job]) -> None:
    """Waits for the client to hang up (the body is already read, so the next ASGI message is the disconnect),
    then frees its rows: the engine drops them at its next step, streaming or not."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.cancelled = True


class Reply:
    """One request's reply, whole (`body`) or streamed as server-sent events (`events_stream`), from the events its
    jobs push. Every way out (done, error, a client that hangs up) cancels the jobs, so their rows are freed."""

    def __init__(self, served: Served, req: ChatRequest | CompletionRequest, prompt_ids: list[int], request: Request,
                 chat: bool) -> None:
        if req.model != served.model_name:
            raise HTTPException(404, f"unknown model {req.model!r}; this server serves {served.model_name!r}")
        if chat:
            if req.top_logprobs is not None and not req.logprobs:
                raise HTTPException(400, "top_logprobs needs logprobs: true")
            self.n_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            self.n_logprobs = req.logprobs
        self.served, self.req, self.prompt_ids, self.chat = served, req, prompt_ids, chat
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs = served.submit(req, prompt_ids, self.n_logprobs, self.events)
        self.watcher = asyncio.create_task(watch_disconnect(request, self.jobs))
        self.rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.counts = [0] * len(self.jobs)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": sum(self.counts),
                "total_tokens": len(self.prompt_ids) + sum(self.counts)}

    def logprobs(self, entries: list[TokenEntry], offset: int) -> dict[str, Any]:
        return self.served.chat_logprobs(entries) if self.chat else self.served.completion_logprobs(entries, offset)

    def close(self) -> None:
        self.watcher.cancel()
        for job in self.jobs:  # an error in one choice, or a client gone, frees the others' rows at the next step
            job.cancelled = True

    async def body(self) -> dict[str, Any]:
        jobs, chat = self.jobs, self.chat
        texts, entries, reasons = [""] * len(jobs), [[] for _ in jobs], [""] * len(jobs)
        try:
            for _ in range(len(jobs)):
                while True:
                    i, kind, *value = await self.events.get()
                    if kind == "text":
                        texts[i] += value[0]
                        entries[i] += value[1]
                    elif kind == "error":
                        raise HTTPException(500, value[0])
                    else:
                        reasons[i], self.counts[i] = value
                        break
        finally:
            self.close()
        choices = []
        for i in range(len(jobs)):
            body = {"message": {"role": "assistant", "content": texts[i]}} if chat else {"text": texts[i]}
            logprobs = None if self.n_logprobs is None else self.logprobs(entries[i], 0)
            choices.append({"index": i, **body, "finish_reason": reasons[i], "logprobs": logprobs})
        return {"id": self.rid, "object": "chat.completion" if chat else "text_completion", "created": self.created,
                "model": self.served.model_name, "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict[str, Any]], with_usage: bool = False) -> str:
        payload = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.served.model_name, "choices": choices}
        if self.req.stream_options and self.req.stream_options.include_usage:
            payload["usage"] = self.usage() if with_usage else None  # OpenAI: null in every chunk, then one last
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def choice(self, i: int, text: str | None, reason: str | None, entries: list[TokenEntry],
               offset: int) -> dict[str, Any]:
        body = ({"delta": {} if text is None else {"content": text}}) if self.chat else {"text": text or ""}
        logprobs = self.logprobs(entries, offset) if self.n_logprobs is not None and entries else None
        return {"index": i, **body, "finish_reason": reason, "logprobs": logprobs}

    async def events_stream(self) -> AsyncIterator[str]:
        offsets = [0] * len(self.jobs)
        try:
            if self.chat:
                yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                   "logprobs": None} for i in range(len(self.jobs))])
            open_jobs = len(self.jobs)
            while open_jobs:
                i, kind, *value = await self.events.get()
                if kind == "text":
                    yield self.chunk([self.choice(i, value[0], None, value[1], offsets[i])])
                    offsets[i] += len(value[0])
                elif kind == "error":
                    yield f"data: {json.dumps(error_body(value[0], 'server_error'))}\n\n"
                    break
                else:
                    self.counts[i] = value[1]
                    yield self.chunk([self.choice(i, None, value[0], [], offsets[i])])
                    open_jobs -= 1
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield self.chunk([], with_usage=True)
            yield "data: [DONE]\n\n"
        finally:
            self.close()


async def respond(served: Served, req: ChatRequest | CompletionRequest, prompt_ids: list[int], request: Request,
                  chat: bool) -> dict[str, Any] | StreamingResponse:
    reply = Reply(served, req, prompt_ids, request, chat)
    if not req.stream:
        return await reply.body()
    return StreamingResponse(reply.events_stream(), media_type="text/event-stream")


def add_info_routes(app: FastAPI, served: Served) -> None:
    """/health (queue, decoding rows, and whether the decode step is compiled yet), /v1/models, and the chat page
    at /."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "queued": served.engine.queued, "decoding": served.engine.busy_rows,
                "decode_step": getattr(served.engine, "decode_step", "eager")}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.model_name, "object": "model", "owned_by": "scratchllm"}]}

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "chat.html")


def add_completion_routes(app: FastAPI, served: Served) -> None:
    """POST /v1/chat/completions and /v1/completions: validate, tokenize off the event loop, `respond`."""

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        messages = [m.model_dump() for m in req.messages]
        served.check_fits(sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in messages))
        try:  # the tokenizer is pure Python: in a worker thread, the event loop keeps serving the live streams
            prompt = await asyncio.to_thread(render_for_completion, served.tok, messages)
        except ChatFormatError as err:
            raise HTTPException(400, str(err)) from None
        return await respond(served, req, prompt, request, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if not req.prompt:
            raise HTTPException(400, "prompt must not be empty")
        served.check_fits(len(req.prompt.encode("utf-8", "surrogatepass")))
        return await respond(served, req, await asyncio.to_thread(served.tok.encode, req.prompt), request, chat=False)


def create_app(model: GPT, tok: Tokenizer, model_name: str = "scratchllm", api_key: str | None = None,
               max_batch: int = 32, max_queue: int = 64, max_body_bytes: int = 1_000_000, prefill_chunk: int = 128,
               engine: Any = None, compile: bool = False) -> Guard:
    """The ASGI app. `engine`: anything with ContinuousEngine's submit/queued/busy_rows/start (the benchmark passes
    the old wave engine as its reference); by default a ContinuousEngine on `model` (`compile`: its decode step
    through torch.compile, built in the background while requests are served uncompiled; one line on stderr says
    when it is ready or that it failed)."""
    # subtle: FastAPI resolves the routes' annotations by name at module level (this file uses postponed annotations)
    app = FastAPI(title="scratchllm", version="0.2.0")
    if engine is None:
        engine = ContinuousEngine(model.eval(), reply_stop_ids(tok), max_batch, max_queue, prefill_chunk,
                                  compile=compile)
    engine.start()
    if compile and getattr(engine, "forward", None) is not None:
        threading.Thread(target=report_compiled, args=(engine,), daemon=True).start()
    app.state.engine = engine
    served = Served(engine, tok, model_name, model.config.max_seq_len, max(len(b) for b in tok.vocab))
    add_error_handlers(app)
    add_info_routes(app, served)
    add_completion_routes(app, served)
    return Guard(app, api_key, max_body_bytes)


def report_compiled(engine: ContinuousEngine) -> None:
    start = time.monotonic()
    engine.forward.wait_compiled()
    print(f"scratchllm serve: decode step {engine.decode_step} after {time.monotonic() - start:.0f} s",
          file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    from scratchllm.infer.generate_cli import add_inference_args, load_for_inference

    parser = argparse.ArgumentParser(prog="scratchllm serve", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--model-name", default="scratchllm")
    parser.add_argument("--max-batch", type=int, default=32, help="rows decoded together (KV cache slots)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger request bodies get 413")
    parser.add_argument("--prefill-chunk", type=int, default=128,
                        help="most prompt tokens prefilled per step, so running streams keep moving")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the decode step with torch.compile (default: on). It is built in the "
                             "background, about a minute of one core on a 2-core CPU, while requests are served by "
                             "the uncompiled step; a compiler that fails leaves the uncompiled step")
    parser.add_argument("--device", default="cpu")
    add_inference_args(parser)
    args = parser.parse_args(argv)
    import uvicorn

    model, tok = load_for_inference(args.checkpoint, args.device, args.quantize, args.lora)
    app = create_app(model, tok, args.model_name, args.api_key, args.max_batch, args.max_queue, args.max_body_bytes,
                     args.prefill_chunk, compile=args.compile)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
