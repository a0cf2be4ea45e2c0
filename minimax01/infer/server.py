"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `"stream": true` as server-sent
events), GET /v1/models, GET /health. Bad requests (unknown fields, wrong types, bad values, a
prompt over the context limit) get a 4xx JSON error in OpenAI's shape and never reach the
engine; a client that disconnects has its request aborted and its cache slot freed; SIGTERM
stops accepting, ends what is in flight, and exits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncEngine
from .chat import ChatTemplate
from .request import MAX_LOGPROBS, SamplingParams, StepOutput

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- request schemas
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, param=None, code=None, kind="invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind, "param": param, "code": code}})


def _validation_message(errors) -> tuple[str, str | None]:
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    if e.get("type") == "extra_forbidden":
        return f"unknown field {field!r}", field
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") == "missing":
        return f"{field}: this field is required", field
    return (f"{field}: {e.get('msg')}" if field else str(e.get("msg"))), field


# ---------------------------------------------------------------------------- the app
def create_app(engine, tokenizer, *, model_name: str = "minimax01", api_key: str | None = None,
               chat_template: str | None = None) -> FastAPI:
    """An app serving `engine` (an infer.engine.Engine). The engine thread starts with the app
    and stops at shutdown."""
    runner = AsyncEngine(engine)
    template = ChatTemplate(tokenizer, chat_template)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        log.info("serving %s (%d slots x %d tokens, chat template: %s)", model_name,
                 engine.pool.num_slots, engine.max_context, template.name)
        try:
            yield
        finally:
            log.info("shutting down: aborting %d running and %d waiting requests",
                     len(engine.scheduler.running), len(engine.scheduler.waiting))
            await asyncio.get_running_loop().run_in_executor(None, runner.shutdown)

    app = FastAPI(title="minimax01", lifespan=lifespan)
    app.state.runner = runner

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc):
        message, field = _validation_message(exc.errors())
        return _error(400, message, field)

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        return _error(exc.status_code, str(exc.detail), kind="invalid_request_error")

    @app.exception_handler(Exception)
    async def on_crash(request, exc):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}", kind="server_error")

    async def authorized(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", kind="authentication_error")

    v1 = [Depends(authorized)]

    # ------------------------------------------------------------------ helpers
    def check_common(req: _Common) -> None:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server has "
                                f"{model_name!r}", "model", "model_not_found")
        if req.n != 1:
            raise APIError(400, f"n: only n=1 is supported, got {req.n}", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name}: penalties are not supported (must be 0)", name)

    def params_of(req: _Common, max_tokens, logprobs) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                              top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop=stop,
                              stop_token_ids=list(req.stop_token_ids or []),
                              ignore_eos=req.ignore_eos, logprobs=logprobs)

    def submit(prompt_ids, params):
        try:
            return runner.submit(prompt_ids, params, f"{uuid.uuid4().hex[:24]}")
        except ValueError as e:
            msg = str(e)
            field = msg.split(":", 1)[0] if ":" in msg.split(" ", 1)[0] else None
            code = "context_length_exceeded" if "context limit" in msg else None
            raise APIError(400, msg, field, code) from None
        except RuntimeError as e:
            raise APIError(503, str(e), kind="server_error") from None

    def token_str(tid: int) -> str:
        return tokenizer.decode([tid]) if tokenizer is not None else str(tid)

    async def collect(rid, queue, request: Request) -> list[StepOutput]:
        """All outputs of a request; [] if the client went away (the request is aborted)."""
        outs, next_check = [], time.monotonic() + 0.25
        while True:
            try:
                out = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                out = None
            if out is not None:
                outs.append(out)
                if out.finished:
                    return outs
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.25
                if await request.is_disconnected():
                    runner.abort(rid)
                    log.info("client gone: aborted %s", rid)
                    return []

    async def respond(rid, queue, request: Request, body):
        """The non-streaming answer `body(outputs, last)` once the request has finished; 499 if
        the client went away, 500 with the engine's error."""
        outs = await collect(rid, queue, request)
        if not outs:
            return JSONResponse(status_code=499, content={})
        last = outs[-1]
        if last.finish_reason == "error":
            return JSONResponse(status_code=500, content=error_body(last))
        return body(outs, last)

    def usage(out: StepOutput) -> dict:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    def finish_reason(out: StepOutput):
        return None if not out.finished else ("length" if out.finish_reason == "length" else "stop")

    def completion_logprobs(outs, offset0=0):
        lps = [lp for o in outs for lp in (o.logprobs or [])]
        if not lps:
            return None
        tokens = [token_str(lp.token_id) for lp in lps]
        offsets, pos = [], offset0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{token_str(t): v for t, v in lp.top} for lp in lps],
                "text_offset": offsets}

    def chat_logprobs(outs):
        lps = [lp for o in outs for lp in (o.logprobs or [])]
        if not lps:
            return None

        def entry(tid, value):
            s = token_str(tid)
            return {"token": s, "logprob": value, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(lp.token_id, lp.logprob),
                             "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def error_body(out: StepOutput) -> dict:
        return {"error": {"message": f"generation failed: {out.error}", "type": "server_error",
                          "param": None, "code": None}}

    async def stream(rid, queue, first, make_chunk, include_usage, make_usage_chunk):
        done = False
        try:
            if first is not None:
                yield sse(first)
            while True:
                out = await queue.get()
                if out.finish_reason == "error":
                    yield sse(error_body(out))
                    done = True
                    break
                yield sse(make_chunk(out))
                if out.finished:
                    done = True
                    if include_usage:
                        yield sse(make_usage_chunk(out))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (or the server is stopping)
                runner.abort(rid)
                log.info("stream closed early: aborted %s", rid)

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if not runner.alive:
            return _error(503, "the engine thread is not running", kind="server_error")
        return {"status": "ok", "model": model_name, **runner.load()}

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "minimax01",
                                            "max_model_len": engine.max_context}]}

    @app.post("/v1/completions", dependencies=v1)
    async def completions(req: CompletionRequest, request: Request):
        check_common(req)
        if req.echo:
            raise APIError(400, "echo: echoing the prompt is not supported", "echo")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs: must be in [0, {MAX_LOGPROBS}], got {req.logprobs}",
                           "logprobs")
        if isinstance(req.prompt, str):
            if tokenizer is None:
                raise APIError(400, "prompt: this server has no tokenizer; send token ids",
                               "prompt")
            prompt_ids = tokenizer.encode(req.prompt, add_bos=True)  # as training and generate
        else:
            prompt_ids = req.prompt
        rid, queue = submit(prompt_ids, params_of(req, req.max_tokens, req.logprobs))
        cid, now = f"cmpl-{rid}", int(time.time())

        def chunk(out):
            return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": out.text,
                                 "logprobs": completion_logprobs([out]),
                                 "finish_reason": finish_reason(out)}]}

        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            usage_chunk = lambda out: {"id": cid, "object": "text_completion", "created": now,  # noqa: E731
                                       "model": model_name, "choices": [], "usage": usage(out)}
            return StreamingResponse(stream(rid, queue, None, chunk, include, usage_chunk),
                                     media_type="text/event-stream")
        return await respond(rid, queue, request, lambda outs, last: {
            "id": cid, "object": "text_completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "text": "".join(o.text for o in outs),
                         "logprobs": completion_logprobs(outs),
                         "finish_reason": finish_reason(last)}],
            "usage": usage(last)})

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(req: ChatRequest, request: Request):
        check_common(req)
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs: must be in [0, {MAX_LOGPROBS}], got "
                                    f"{req.top_logprobs}", "top_logprobs")
        if tokenizer is None:
            raise APIError(400, "messages: this server has no tokenizer for chat", "messages")
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else \
                "".join(p.text for p in (m.content or []))
            messages.append({"role": m.role, "content": content})
        try:
            prompt = template.render(messages)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        # a tokenizer's own template writes its special tokens; the default one gets BOS
        ids = tokenizer.encode(prompt, add_bos=template.name == "default")
        rid, queue = submit(ids, params_of(req, max_tokens, logprobs))
        cid, now = f"chatcmpl-{rid}", int(time.time())

        def chunk(out):
            delta = {"content": out.text} if out.text or not out.finished else {}
            return {"id": cid, "object": "chat.completion.chunk", "created": now,
                    "model": model_name,
                    "choices": [{"index": 0, "delta": delta,
                                 "logprobs": chat_logprobs([out]) if req.logprobs else None,
                                 "finish_reason": finish_reason(out)}]}

        if req.stream:
            first = {"id": cid, "object": "chat.completion.chunk", "created": now,
                     "model": model_name, "choices": [{"index": 0, "delta": {
                         "role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]}
            include = bool(req.stream_options and req.stream_options.include_usage)
            usage_chunk = lambda out: {"id": cid, "object": "chat.completion.chunk",  # noqa: E731
                                       "created": now, "model": model_name, "choices": [],
                                       "usage": usage(out)}
            return StreamingResponse(stream(rid, queue, first, chunk, include, usage_chunk),
                                     media_type="text/event-stream")
        return await respond(rid, queue, request, lambda outs, last: {
            "id": cid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": "".join(o.text for o in outs)},
                         "logprobs": chat_logprobs(outs) if req.logprobs else None,
                         "finish_reason": finish_reason(last)}],
            "usage": usage(last)})

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout: float = 10.0, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM; open streams get `graceful_timeout` seconds, then are cut."""
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn re-raises SIGTERM after its graceful shutdown, so the process dies of the
            signal; here the shutdown is the end of serve(), and the command exits with 0."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_timeout)
    Server(config).run()
    log.info("server stopped")
