"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `"stream": true` as server-sent
events), GET /v1/models, GET /v1/models/{id}, GET /health. The request path, in order:
  1. `Guard` (plain ASGI, before any body is read): 401 without the API key (everything but
     /health, /docs and /openapi.json included), 413 for a declared body over the limit;
  2. `protocol.parse_body`: strict UTF-8 and JSON, strict schema, no lone surrogates;
  3. `_Handler.params`: OpenAI's ranges and what this server supports, then the engine's own
     validation (`RequestError` with a code and the field: mapped, never parsed);
so every bad request is a 4xx in OpenAI's error shape naming the `param`, and never reaches the
engine. A client that disconnects has its request aborted and its slot freed. On SIGTERM the
server stops accepting, lets running requests go on for the grace period, then ends each with a
final error event ("server_shutdown") and `data: [DONE]`, and exits with status 0."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncEngine
from .chat import ChatTemplate
from .protocol import (APIError, ChatRequest, CompletionRequest, error_body, parse_body,
                       read_body, too_large)
from .request import MAX_LOGPROBS, EngineError, RequestError, SamplingParams, StepOutput
from .tools import CALL_PREFIX, ToolCallStream, parse_tool_calls

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2 ** 20
_BIG = 256 * 1024              # bytes / characters: parse and tokenize off the event loop
MAX_TEMPERATURE = 2.0          # OpenAI's range: 0 to 2
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STATUS_OF = {"server_shutdown": 503, "engine_unavailable": 503}  # other engine codes: 500


def _json(status: int, body: dict) -> JSONResponse:
    return JSONResponse(status_code=status, content=body)


class Guard:
    """Checks the API key and the declared body size before anything reads the body."""

    def __init__(self, app, api_key: str | None, max_body: int, open_paths=("/health",)):
        self.app, self.max_body, self.open_paths = app, max_body, set(open_paths)
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            error = None
            if self.expected is not None and scope["path"] not in self.open_paths and \
                    not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                error = APIError(401, "missing or wrong API key (send 'Authorization: Bearer "
                                      "KEY')", None, "invalid_api_key", "authentication_error")
            elif headers.get(b"content-length", b"0").isdigit() and \
                    int(headers.get(b"content-length", b"0")) > self.max_body:
                error = too_large(self.max_body)
            if error is not None:
                await _json(error.status, error.body())(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------- the app
def create_app(engine, tokenizer, *, model_name: str = "minimax01", api_key: str | None = None,
               chat_template: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """An app serving `engine` (an infer.engine.Engine). The engine thread starts with the app
    and stops at shutdown; `app.state.runner` is its AsyncEngine."""
    runner = AsyncEngine(engine)
    template = ChatTemplate(tokenizer, chat_template)
    handler = _Handler(runner, engine, tokenizer, template, model_name)

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
    app.add_middleware(Guard, api_key=api_key, max_body=max_body_bytes)

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return _json(exc.status, exc.body())

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc):  # path parameters only: bodies are parsed by hand
        return _json(400, error_body(str(exc.errors()[0].get("msg")), code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        return _json(exc.status_code, error_body(str(exc.detail)))

    @app.exception_handler(Exception)
    async def on_crash(request, exc):
        log.exception("unhandled error")
        return _json(500, error_body(f"internal error: {type(exc).__name__}", "server_error"))

    @app.get("/health")
    async def health():
        if not runner.alive:
            return _json(503, error_body("the engine thread is not running", "server_error"))
        return {"status": "draining" if runner.draining else "ok", "model": model_name,
                **runner.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [handler.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        handler.check_model(model_id, param=None)
        return handler.model_card()

    async def parse(request: Request, schema):
        raw = await read_body(request, max_body_bytes)
        return await _off_loop(len(raw), parse_body, raw, schema)

    @app.post("/v1/completions", openapi_extra=_body_doc("CompletionRequest"))
    async def completions(request: Request):
        return await handler.completion(await parse(request, CompletionRequest), request)

    @app.post("/v1/chat/completions", openapi_extra=_body_doc("ChatRequest"))
    async def chat_completions(request: Request):
        return await handler.chat(await parse(request, ChatRequest), request)

    def openapi():  # the hand-parsed bodies' schemas, for /docs
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version="1", routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in (CompletionRequest, ChatRequest):
                js = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[m.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


async def _off_loop(size: int, fn, *args):
    """fn(*args), in a worker thread when the input is large, so that parsing or tokenizing a
    big prompt does not hold up the event loop (and every open stream) meanwhile."""
    if size < _BIG:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _body_doc(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _finish(out: StepOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


# ---------------------------------------------------------------------------- requests
class _Handler:
    """Turns validated request models into engine requests and engine outputs into OpenAI
    responses (a JSON body, or server-sent events)."""

    def __init__(self, runner, engine, tokenizer, template, model_name):
        self.runner, self.engine, self.tok, self.template = runner, engine, tokenizer, template
        self.model_name, self.created = model_name, int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "minimax01", "max_model_len": self.engine.max_context}

    def check_model(self, name: str, param: str | None = "model") -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server has "
                                f"{self.model_name!r}", param, "model_not_found")

    # ------------------------------------------------------------------ validation
    def params(self, req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """OpenAI's ranges and this server's limits; SamplingParams.validate (in the engine)
        does the rest."""
        def unsupported(param, why):
            raise APIError(400, f"{param}: {why}", param, "unsupported_value")

        def out_of_range(param, why):
            raise APIError(400, f"{param}: {why}", param, "invalid_value")

        self.check_model(req.model)
        if req.n not in (None, 1):
            unsupported("n", f"only n=1 is supported, got {req.n}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            if value is not None and not -2 <= value <= 2:
                out_of_range(name, f"must be in [-2, 2], got {value}")
            if value:
                unsupported(name, "penalties are not supported (must be 0)")
        temperature = 1.0 if req.temperature is None else req.temperature
        if not 0 <= temperature <= MAX_TEMPERATURE:
            out_of_range("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {temperature}")
        top_p = 1.0 if req.top_p is None else req.top_p
        if not 0 < top_p <= 1:
            out_of_range("top_p", f"must be in (0, 1], got {top_p}")
        bias = None
        if req.logit_bias:
            bias = {}
            for key, value in req.logit_bias.items():
                if not re.fullmatch(r"\d{1,12}", key):
                    out_of_range("logit_bias", f"key {key[:40]!r} is not a token id")
                bias[int(key)] = value
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=0 if req.top_k is None else req.top_k, seed=req.seed,
                              stop=stop, stop_token_ids=list(req.stop_token_ids or []),
                              ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
                              logit_bias=bias)

    def submit(self, prompt_ids, params, rename: dict[str, str]):
        try:
            return self.runner.submit(prompt_ids, params, uuid.uuid4().hex[:24])
        except RequestError as e:
            raise APIError(400, e.message, rename.get(e.param, e.param), e.code) from None
        except EngineError as e:
            raise APIError(_STATUS_OF.get(e.code, 500), e.message, None, e.code,
                           "server_error") from None

    async def encode(self, text: str, add_bos: bool) -> list[int]:
        if self.tok is None:
            raise APIError(400, "prompt: this server has no tokenizer; send token ids",
                           "prompt", "unsupported_value")
        return await _off_loop(len(text), self.tok.encode, text, add_bos)

    def token_str(self, tid: int) -> str:
        return self.tok.decode([tid]) if self.tok is not None else str(tid)

    # ------------------------------------------------------------------ completions
    async def completion(self, req: CompletionRequest, request: Request):
        if req.suffix is not None:
            raise APIError(400, "suffix: inserting text (a suffix) is not supported", "suffix",
                           "unsupported_value")
        if req.best_of not in (None, 1):
            raise APIError(400, f"best_of: only best_of=1 is supported, got {req.best_of}",
                           "best_of", "unsupported_value")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs: must be in [0, {MAX_LOGPROBS}], got {req.logprobs}",
                           "logprobs", "invalid_value")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request (got a list of "
                                    f"{len(prompt)}; send them as separate requests)", "prompt",
                               "unsupported_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await self.encode(prompt, add_bos=True)  # as training and generate
            echo_text = prompt
        else:
            ids = prompt
            echo_text = self.tok.decode(ids) if req.echo and self.tok is not None else ""
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo: echo with logprobs (prompt log-probs) is not supported",
                           "echo", "unsupported_value")
        echo = echo_text if req.echo else ""
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
        params = self.params(req, max_tokens, req.logprobs)
        rid, queue = self.submit(ids, params, {})
        cid, now = f"cmpl-{rid}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": now, "model": self.model_name}

        def logprobs(outs, limit=None):
            lps = [lp for o in outs for lp in (o.logprobs or [])]
            if req.logprobs is None:
                return None
            lps = lps[:limit]
            return {"tokens": [self.token_str(lp.token_id) for lp in lps],
                    "token_logprobs": [lp.logprob for lp in lps],
                    "top_logprobs": [{self.token_str(t): v for t, v in lp.top} for lp in lps],
                    "text_offset": [len(echo) + lp.text_offset for lp in lps]}

        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            sent_echo = [False]

            def chunks(out):
                text = out.text
                if not sent_echo[0]:
                    text, sent_echo[0] = echo + text, True
                c = {**head, "choices": [{"index": 0, "text": text, "logprobs": logprobs([out]),
                                          "finish_reason": _finish(out) if out.finished
                                          else None}]}
                return [c]

            return self.stream(rid, queue, [], chunks, include, head)
        outs = await self.collect(rid, queue, request)
        last = outs[-1]
        return {**head, "choices": [{
            "index": 0, "text": echo + "".join(o.text for o in outs),
            "logprobs": logprobs(outs, last.completion_tokens), "finish_reason": _finish(last)}],
            "usage": self.usage(last)}

    # ------------------------------------------------------------------ chat
    async def chat(self, req: ChatRequest, request: Request):
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError(400, "top_logprobs: needs logprobs=true", "top_logprobs",
                               "invalid_value")
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs: must be in [0, {MAX_LOGPROBS}], got "
                                    f"{req.top_logprobs}", "top_logprobs", "invalid_value")
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format: {req.response_format.type!r} needs "
                                "constrained decoding, which this server does not do; only "
                                "{'type': 'text'} is supported", "response_format",
                           "unsupported_value")
        if self.tok is None:
            raise APIError(400, "messages: this server has no tokenizer for chat", "messages",
                           "unsupported_value")
        tools, names, prefix = self.tools(req)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            prompt = self.template.render(messages, tools, prefix)
        except RequestError as e:
            raise APIError(400, e.message, e.param, e.code) from None
        # a tokenizer's own template writes its special tokens; the default one gets BOS
        ids = await self.encode(prompt, add_bos=self.template.name == "default")
        use_max = "max_completion_tokens" if req.max_completion_tokens is not None \
            else "max_tokens"
        max_tokens = getattr(req, use_max)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.params(req, max_tokens, logprobs)
        rid, queue = self.submit(ids, params, {"prompt": "messages", "max_tokens": use_max,
                                               "logprobs": "top_logprobs"})
        cid, now = f"chatcmpl-{rid}", int(time.time())
        head = {"id": cid, "object": "chat.completion.chunk", "created": now,
                "model": self.model_name}

        def lp_entry(tid, value):
            s = self.token_str(tid)
            return {"token": s, "logprob": value, "bytes": list(s.encode("utf-8"))}

        def chat_logprobs(outs, limit=None):
            if not req.logprobs:
                return None
            lps = [lp for o in outs for lp in (o.logprobs or [])][:limit]
            return {"content": [{**lp_entry(lp.token_id, lp.logprob),
                                 "top_logprobs": [lp_entry(t, v) for t, v in lp.top]}
                                for lp in lps]}

        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            calls = ToolCallStream(names, prefix) if names else None

            def choice(delta, finish=None, lps=None):
                return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": lps,
                                             "finish_reason": finish}]}

            def chunks(out):
                text = calls.push(out.text) if calls is not None else out.text
                lps = chat_logprobs([out]) if out.logprobs else None
                result = [choice({"content": text}, None, lps)] if text or lps or \
                    not out.finished else []
                if out.finished:
                    finish = _finish(out)
                    if calls is not None:
                        rest, found = calls.finish()
                        if rest:
                            result.append(choice({"content": rest}))
                        if found:
                            result.append(choice({"tool_calls": [
                                c.to_openai(i) for i, c in enumerate(found)]}))
                            finish = "tool_calls"
                    result.append(choice({}, finish))
                return result

            first = [choice({"role": "assistant", "content": ""})]
            return self.stream(rid, queue, first, chunks, include, head)
        outs = await self.collect(rid, queue, request)
        last = outs[-1]
        text = "".join(o.text for o in outs)
        message = {"role": "assistant", "content": text}
        finish = _finish(last)
        if names:
            content, found = parse_tool_calls(prefix + text if prefix else text, names)
            if found:
                message = {"role": "assistant", "content": content,
                           "tool_calls": [c.to_openai() for c in found]}
                finish = "tool_calls"
        return {**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": message,
            "logprobs": chat_logprobs(outs, last.completion_tokens), "finish_reason": finish}],
            "usage": self.usage(last)}

    def tools(self, req: ChatRequest) -> tuple[list[dict] | None, set[str], str]:
        """(the tools to render, the names whose calls are parsed back, the prompt prefix a
        forced tool_choice puts after the generation prompt)."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise APIError(400, "tool_choice: needs tools", "tool_choice", "invalid_value")
            return None, set(), ""
        names: list[str] = []
        for i, t in enumerate(req.tools):
            name = t.function.name
            if not _TOOL_NAME.match(name):
                raise APIError(400, f"tools[{i}].function.name: must be 1-64 characters of a-z, "
                                    f"A-Z, 0-9, _ and -, got {name[:80]!r}",
                               f"tools[{i}].function.name", "invalid_value")
            if name in names:
                raise APIError(400, f"tools[{i}].function.name: {name!r} is given twice",
                               f"tools[{i}].function.name", "invalid_value")
            names.append(name)
        if choice == "none":
            return None, set(), ""
        call_start = self.template.call_token + CALL_PREFIX
        prefix = ""
        if choice == "required":
            prefix = call_start
        elif choice not in (None, "auto"):
            if choice.function.name not in names:
                raise APIError(400, f"tool_choice.function.name: {choice.function.name!r} is "
                                    "not one of the tools", "tool_choice.function.name",
                               "invalid_value")
            prefix = f"{call_start}{choice.function.name}("
        return [t.model_dump(exclude_none=True) for t in req.tools], set(names), prefix

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def usage(out: StepOutput) -> dict:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    @staticmethod
    def failure(out: StepOutput) -> APIError:
        return APIError(_STATUS_OF.get(out.error_code, 500), f"generation failed: {out.error}",
                        None, out.error_code, "server_error")

    async def collect(self, rid, queue, request: Request) -> list[StepOutput]:
        """All outputs of a finished request (APIError if it failed); if the client goes away
        the request is aborted (and nobody reads the answer)."""
        outs, next_check = [], time.monotonic() + 0.25
        while True:
            try:
                out = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                out = None
            if out is not None:
                if out.finish_reason == "error":
                    raise self.failure(out)
                outs.append(out)
                if out.finished:
                    return outs
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.25
                if await request.is_disconnected():
                    self.runner.abort(rid)
                    log.info("client gone: aborted %s", rid)
                    raise APIError(499, "the client closed the connection", None,
                                   "client_closed")

    def stream(self, rid, queue, first: list[dict], chunks, include_usage: bool, head: dict):
        async def events():
            done = False
            try:
                for c in first:
                    yield _sse(c)
                while True:
                    out = await queue.get()
                    if out.finish_reason == "error":
                        done = True
                        yield _sse(self.failure(out).body())
                        break
                    for c in chunks(out):
                        if include_usage:
                            c["usage"] = None
                        yield _sse(c)
                    if out.finished:
                        done = True
                        if include_usage:
                            yield _sse({**head, "choices": [], "usage": self.usage(out)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not done:  # the client went away
                    self.runner.abort(rid)
                    log.info("stream closed early: aborted %s", rid)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout: float = 10.0, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM. Then: no new connections or requests; running requests have
    `graceful_timeout` seconds, after which each ends with a final error event and [DONE]; the
    engine stops and serve() returns (the command exits with 0). A second signal forces exit."""
    import signal
    import threading

    import uvicorn

    runner: AsyncEngine = app.state.runner

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            runner.drain(graceful_timeout)  # only sets an attribute: safe in a signal handler
            super().handle_exit(sig, frame)

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

    # uvicorn's own cut-off only backs ours up: by then every stream has had its final event
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_timeout + 5)
    Server(config).run()
    log.info("server stopped")
