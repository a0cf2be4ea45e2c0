"""Requests to responses for the OpenAI routes: `Handler` checks a validated body against OpenAI's
ranges and what this server supports, builds the engine request (prompt ids, SamplingParams),
submits it (mapping the engine's error codes, never its messages), and turns the engine's
StepOutputs into a JSON body or server-sent events (text, log-probs, tool calls, usage).

Images (`image_url` parts of user messages, VL models only) are decoded under the server's
MediaPolicy (infer/media.py) and preprocessed off the event loop; each stands in the rendered
prompt as a one-off marker, which becomes that image's run of `<image>` tokens after the text
around it is tokenized (so no text, whatever it holds, can stand for an image)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..vision.chat import encode_with_images
from .media import MediaPolicy, load_image_url
from .protocol import APIError, ChatRequest, CompletionRequest
from .request import MAX_LOGPROBS, EngineError, RequestError, SamplingParams, StepOutput
from .tools import CALL_PREFIX, ToolCallStream, parse_tool_calls

log = logging.getLogger(__name__)

BIG = 256 * 1024               # bytes / characters: parse and tokenize off the event loop
MAX_TEMPERATURE = 2.0          # OpenAI's range: 0 to 2
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STATUS_OF = {"server_shutdown": 503, "engine_unavailable": 503}  # other engine codes: 500

async def off_loop(size: int, fn, *args):
    """fn(*args), in a worker thread when the input is large, so that parsing or tokenizing a
    big prompt does not hold up the event loop (and every open stream) meanwhile."""
    if size < BIG:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _finish(out: StepOutput) -> str:
    return "length" if out.finish_reason == "length" else "stop"


class Handler:
    """Turns validated request models into engine requests and engine outputs into OpenAI
    responses (a JSON body, or server-sent events)."""

    def __init__(self, runner, engine, tokenizer, template, model_name,
                 media: MediaPolicy | None = None):
        self.runner, self.engine, self.tok, self.template = runner, engine, tokenizer, template
        self.model_name, self.created = model_name, int(time.time())
        self.media = media or MediaPolicy()

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

    def submit(self, prompt_ids, params, rename: dict[str, str], images=None):
        try:
            return self.runner.submit(prompt_ids, params, uuid.uuid4().hex[:24], images)
        except RequestError as e:
            raise APIError(400, e.message, rename.get(e.param, e.param), e.code) from None
        except EngineError as e:
            raise APIError(_STATUS_OF.get(e.code, 500), e.message, None, e.code,
                           "server_error") from None

    async def encode(self, text: str, add_bos: bool) -> list[int]:
        if self.tok is None:
            raise APIError(400, "prompt: this server has no tokenizer; send token ids",
                           "prompt", "unsupported_value")
        return await off_loop(len(text), self.tok.encode, text, add_bos)

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
        parts = self.image_parts(messages)
        marker = f"<image-{uuid.uuid4().hex}>"  # no text can be it
        for i, j, _ in parts:
            messages[i]["content"][j] = {"type": "text", "text": marker}
        try:
            prompt = self.template.render(messages, tools, prefix)
        except RequestError as e:
            raise APIError(400, e.message, e.param, e.code) from None
        # a tokenizer's own template writes its special tokens; the default one gets BOS
        add_bos = self.template.name == "default"
        images = None
        if parts:
            ids, images = await asyncio.get_running_loop().run_in_executor(
                None, self.with_images, prompt, marker, parts, add_bos)
        else:
            ids = await self.encode(prompt, add_bos=add_bos)
        use_max = "max_completion_tokens" if req.max_completion_tokens is not None \
            else "max_tokens"
        max_tokens = getattr(req, use_max)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.params(req, max_tokens, logprobs)
        rid, queue = self.submit(ids, params, {"prompt": "messages", "max_tokens": use_max,
                                               "logprobs": "top_logprobs"}, images)
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

    def image_parts(self, messages: list[dict]) -> list[tuple[int, int, str]]:
        """(message index, part index, url) of every image part; APIError for images this
        server or model does not take (before anything is decoded)."""
        found = []
        for i, m in enumerate(messages):
            content = m.get("content")
            for j, part in enumerate(content if isinstance(content, list) else []):
                if part.get("type") != "image_url":
                    continue
                param = f"messages[{i}].content[{j}].image_url"
                if m["role"] != "user":
                    raise APIError(400, f"{param}: only user messages may hold images", param,
                                   "invalid_value")
                if getattr(self.engine, "vision", None) is None:
                    raise APIError(400, f"{param}: this model does not take images", param,
                                   "unsupported_value")
                found.append((i, j, part["image_url"]["url"]))
        if len(found) > self.media.max_images:
            raise APIError(400, f"messages: {len(found)} images, more than this server's limit "
                                f"of {self.media.max_images} per request", "messages",
                           "too_many_images")
        return found

    def with_images(self, prompt: str, marker: str, parts, add_bos: bool):
        """(prompt ids with each marker replaced by its image's `<image>` tokens, the images
        preprocessed for the engine); runs in a worker thread (decoding, resizing)."""
        vision = self.engine.vision
        pieces = prompt.split(marker)
        if len(pieces) != len(parts) + 1:
            raise APIError(400, "messages: the chat template does not show every image",
                           "messages", "unsupported_value")
        try:
            loaded = [load_image_url(url, self.media, f"messages[{i}].content[{j}].image_url")
                      for i, j, url in parts]
            ids = encode_with_images(self.tok, prompt, [(i.image.height, i.image.width)
                                                        for i in loaded],
                                     vision.processor, vision.image_token_id, add_bos, marker)
            param = "messages" if len(parts) > 1 else \
                f"messages[{parts[0][0]}].content[{parts[0][1]}].image_url"
            inputs = vision.prepare(ids, [img.image for img in loaded],
                                    [img.sha256 for img in loaded], param)
        except RequestError as e:
            param = "messages" if e.param == "prompt" else e.param
            raise APIError(400, e.message.replace("prompt:", "messages:", 1), param,
                           e.code) from None
        return ids, inputs

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
                "total_tokens": out.prompt_tokens + out.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}

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
