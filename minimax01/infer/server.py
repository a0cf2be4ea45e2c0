"""OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `"stream": true` as server-sent
events), GET /v1/models, GET /v1/models/{id}, GET /health. The request path, in order:
  1. `Guard` (plain ASGI, before any body is read): 401 without the API key (everything but
     /health, /docs and /openapi.json included), 413 for a declared body over the limit;
  2. `protocol.parse_body`: strict UTF-8 and JSON, strict schema, no lone surrogates;
  3. `handlers.Handler.params`: OpenAI's ranges and what this server supports, then the
     engine's own validation (`RequestError` with a code and the field: mapped, never parsed);
so every bad request is a 4xx in OpenAI's error shape naming the `param`, and never reaches the
engine. A client that disconnects has its request aborted and its slot freed. On SIGTERM the
server stops accepting, lets running requests go on for the grace period, then ends each with a
final error event ("server_shutdown") and `data: [DONE]`, and exits with status 0."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncEngine
from .chat import ChatTemplate
from .handlers import Handler, off_loop
from .media import MediaPolicy
from .protocol import (APIError, ChatRequest, CompletionRequest, error_body, parse_body,
                       read_body, too_large)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2 ** 20


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
               chat_template: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               media: MediaPolicy | None = None) -> FastAPI:
    """An app serving `engine` (an infer.engine.Engine). The engine thread starts with the app
    and stops at shutdown; `app.state.runner` is its AsyncEngine. `media`: the images a VL
    model's requests may carry (infer/media.py)."""
    runner = AsyncEngine(engine)
    template = ChatTemplate(tokenizer, chat_template)
    handler = Handler(runner, engine, tokenizer, template, model_name, media)

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
        return await off_loop(len(raw), parse_body, raw, schema)

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


def _body_doc(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


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
