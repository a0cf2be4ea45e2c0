"""The OpenAI API's request bodies as strict pydantic models, and the one way a body becomes one:
`parse_body` reads the raw bytes (size-limited), decodes strict UTF-8 and strict JSON (no NaN, no
Infinity, no 1e999, no lone surrogate anywhere), and validates. Every failure is an APIError
(HTTP status, message, the offending `param`, a `code`) that the server turns into OpenAI's
error body {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------- schemas
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class _Common(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


# ---------------------------------------------------------------------------- bodies
MAX_DEPTH = 64


async def read_body(request, limit: int) -> bytes:
    """The raw body, refused with 413 past `limit` bytes (also when no Content-Length)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise too_large(limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", None,
                    "request_too_large")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """bytes -> a validated `model` instance, or APIError 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})", None,
                       "invalid_json") from None
    if not text.strip():
        raise APIError(400, "the request body is empty: send a JSON object", None,
                       "invalid_json")
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, "
                            f"column {e.colno})", None, "invalid_json") from None
    except (ValueError, RecursionError) as e:  # NaN / 1e999 / ints of > 4300 digits / nesting
        raise APIError(400, f"the request body is not valid JSON: "
                            f"{_one_line(e) or type(e).__name__}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got a "
                            f"{type(body).__name__}", None, "invalid_json")
    _check_tree(body)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _one_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else ""


def _check_tree(body: dict) -> None:
    """No lone surrogate in any string (key or value), nesting at most MAX_DEPTH deep;
    iterative, so a hostile body cannot exhaust the stack here."""
    stack = [(body, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"{path or 'the body'}: nested deeper than {MAX_DEPTH} levels",
                           path or None, "invalid_value")
        if isinstance(node, dict):
            for k, v in node.items():
                p = f"{path}.{k}" if path else k
                if _surrogate(k):
                    raise APIError(400, f"{path or 'the body'}: a key holds a lone UTF-16 "
                                        "surrogate (not valid Unicode)", path or None,
                                   "invalid_value")
                stack.append((v, p, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))
        elif isinstance(node, str) and _surrogate(node):
            i = next(j for j, ch in enumerate(node) if "\ud800" <= ch <= "\udfff")
            raise APIError(400, f"{path}: lone UTF-16 surrogate {node[i]!r} at character {i} "
                                "(not valid Unicode)", path, "invalid_value")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate(s: str) -> bool:
    return _SURROGATE.search(s) is not None


_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc) -> str | None:
    """pydantic's error location -> OpenAI's param ("messages[0].content"), without the tags
    pydantic puts in for union members and dict keys."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _FIELD.match(part) and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out or None


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors(include_url=False)
    first = errors[0]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        return APIError(400, f"{param}: unknown field (not a parameter of this endpoint)",
                        param, "unknown_parameter")
    if first["type"] == "missing":
        return APIError(400, f"{param}: this field is required", param,
                        "missing_required_parameter")
    msgs = []
    for err in errors:
        if _param(err["loc"]) == param and err["msg"] not in msgs:
            msgs.append(err["msg"])
    return APIError(400, f"{param}: {'; or '.join(msgs[:3])}", param, "invalid_type"
                    if any(err["type"].endswith("_type") for err in errors) else "invalid_value")
