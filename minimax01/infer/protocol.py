"""The OpenAI API's request bodies as strict pydantic models, and the one way a body becomes one:
`parse_body` decodes strict UTF-8 and strict JSON (no NaN, no Infinity, no 1e999, no integer of
more than 40 digits, no lone surrogate, at most 64 levels deep: each refused naming where it is),
and validates; `read_body` reads the raw bytes up to a size limit. Every failure is an APIError
(HTTP status, message, the offending `param`, a `code`) that the server turns into OpenAI's
error body {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


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


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image is any-res


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = \
        None
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
    try:  # odd numbers become markers that _check_tree reports with their place
        body = json.loads(text, parse_constant=_BadNumber, parse_int=_int)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, "
                            f"column {e.colno})", None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, f"the request body is nested deeper than {MAX_DEPTH} levels", None,
                       "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got a "
                            f"{type(body).__name__}", None, "invalid_json")
    _check_tree(body)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None


class _BadNumber:
    """NaN / Infinity (not JSON) or an integer too long to be meant, kept for _check_tree."""

    def __init__(self, text: str):
        self.text = text if len(text) <= 40 else f"an integer of {len(text)} digits"


def _int(text: str):
    return int(text) if len(text.lstrip("-")) <= 40 else _BadNumber(text)


def _check_tree(body: dict) -> None:
    """No lone surrogate in any string (key or value), no NaN/inf/huge number, nesting at most
    MAX_DEPTH deep; iterative, so a hostile body cannot exhaust the stack here."""
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
        elif isinstance(node, _BadNumber) or (isinstance(node, float)
                                              and not math.isfinite(node)):
            text = node.text if isinstance(node, _BadNumber) else "a number out of range"
            raise APIError(400, f"{path}: {text} is not a valid number here", path,
                           "invalid_value")
        elif isinstance(node, str) and _surrogate(node):
            i = next(j for j, ch in enumerate(node) if "\ud800" <= ch <= "\udfff")
            raise APIError(400, f"{path}: lone UTF-16 surrogate {node[i]!r} at character {i} "
                                "(not valid Unicode)", path, "invalid_value")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate(s: str) -> bool:
    return _SURROGATE.search(s) is not None


_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _untagged(loc) -> list:
    """`loc` without a discriminated union's tags: pydantic puts the list's type
    ('list[tagged-union[...]]') and, after the index, the member's tag (the value of `type`)."""
    out, tagged = [], False
    for part in loc:
        if isinstance(part, str) and "tagged-union[" in part:
            tagged = True
            continue
        if tagged and isinstance(part, str) and out and isinstance(out[-1], int):
            tagged = False
            continue
        out.append(part)
    return out


def _param(loc) -> str | None:
    """pydantic's error location -> OpenAI's param ("messages[0].content"), without the tags
    pydantic puts in for union members and dict keys."""
    out = ""
    for part in _untagged(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif _FIELD.match(part) and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out or None


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors(include_url=False)
    # a union reports one error per member; the deepest is the member the value was meant for
    # (stop: [1] -> "stop[0]", not "stop" for the string member)
    depth = [sum(1 for part in _untagged(err["loc"]) if isinstance(part, int) or (
        _FIELD.match(part) and part not in _TYPE_TAGS)) for err in errors]
    first = errors[depth.index(max(depth))]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":  # the key itself, whatever its spelling
        head, key = _param(first["loc"][:-1]), str(first["loc"][-1])
        param = f"{head}.{key}" if head else key
        return APIError(400, f"{param}: unknown field (not a parameter of this endpoint)",
                        param, "unknown_parameter")
    if first["type"] == "missing":
        return APIError(400, f"{param}: this field is required", param,
                        "missing_required_parameter")
    same = [err for err in errors if _param(err["loc"]) == param]
    msgs = list(dict.fromkeys(err["msg"] for err in same))
    kind = "invalid_type" if any(err["type"].endswith("_type") for err in same) \
        else "invalid_value"
    return APIError(400, f"{param}: {'; or '.join(msgs[:3])}", param, kind)
