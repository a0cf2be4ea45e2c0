"""Chat messages (OpenAI's shape) -> prompt text: the tokenizer's own Jinja chat template
(`chat_template` in tokenizer_config.json, rendered as transformers renders it: `tools`,
`add_generation_prompt`, `bos_token`/`eos_token`, its `tojson` and `{% generation %}`) or,
without one, a plain default:

    <|system|>
    You are ...
    <|user|>
    What's the weather in Paris?
    <|functions|>
    {"type": "function", "function": {"name": "get_weather", ...}}
    <|assistant|>

Templates differ in what they expect, so one probe render at start-up finds out whether this
template wants `content` as a string or as a list of typed parts (MiniMax-Text-01's loops over
`{"type": "text", ...}` items), whether it shows `tool` results or only the older `function` role
(MiniMax-Text-01: `system function_response=functions`), and whether it shows an assistant's
`tool_calls` (if not, they are written into its content in the model's call format). The
request is never adapted by matching template text."""

from __future__ import annotations

import json
from datetime import datetime

from .request import RequestError
from .tools import CALL_TOKEN, format_call

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_PROBE = "PROBE_5f0c1d"

# The MiniMax-Text-01 / VL-01 chat format (/work/shared/VL01.md section 8): turns
# `<beginning_of_sentence>{header}\n{content}<end_of_sentence>\n`, content a list of typed items,
# function results as `system function_response=functions`, one `system function_setting=functions`
# block per tool, the generation prompt `<beginning_of_sentence>ai name=assistant\n`.
TEXT01_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<beginning_of_sentence>system ai_setting=assistant\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<beginning_of_sentence>user name=user\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}"
    "{% endif %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{% for item in message['content'] %}"
    "{% if item.type == 'image' %}<image>{% elif item.type == 'text' %}{{ item.text }}{% endif %}"
    "{% endfor %}{{ '<end_of_sentence>\\n' }}{% endif %}"
    "{% if message['role'] == 'function' %}"
    "{{ '<beginning_of_sentence>system function_response=functions\\n' + '{\"name\": \"' "
    "+ message['name'] + '\", \"response\": ' + message['content'][0]['text'] + '}' "
    "+ '<end_of_sentence>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if tools %}{% for function in tools %}"
    "{{ '<beginning_of_sentence>system function_setting=functions\\n' + function | tojson "
    "+ '<end_of_sentence>\\n' }}{% endfor %}{% endif %}"
    "{% if add_generation_prompt %}{{ '<beginning_of_sentence>ai name=assistant\\n' }}"
    "{% generation %}{% endgeneration %}{% endif %}"
)


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content)


class ChatTemplate:
    def __init__(self, tokenizer=None, template: str | None = None):
        self.source = template or getattr(tokenizer, "chat_template", None)
        self.tokenizer = tokenizer
        self._compiled = None
        if isinstance(self.source, list):  # the named-template form: take "default"
            named = {t.get("name"): t.get("template") for t in self.source}
            self.source = named.get("default") or next(iter(named.values()), None)
        encode = getattr(tokenizer, "encode", None)
        # the model's call token, when the tokenizer has it (MiniMax-Text-01's does)
        self.call_token = CALL_TOKEN if encode and len(encode(CALL_TOKEN)) == 1 else ""
        self.parts, self.tool_role, self.shows_tool_calls, self.shows_tools = \
            False, "tool", True, True
        if self.source:
            self._compiled = _compile(self.source)
            self._probe()

    @property
    def name(self) -> str:
        return "tokenizer" if self._compiled is not None else "default"

    # ------------------------------------------------------------------ rendering
    def render(self, messages: list[dict], tools: list[dict] | None = None,
               prefix: str = "", add_generation_prompt: bool = True) -> str:
        """messages: [{"role", "content" (str, list of text parts or None), "name"?,
        "tool_calls"? (OpenAI's dicts), "tool_call_id"?}]; tools: OpenAI tool dicts; `prefix`
        is appended after the generation prompt (the start of the assistant's answer).
        `add_generation_prompt=False` renders a finished conversation (training data).
        RequestError naming the message at fault for a conversation it cannot show."""
        msgs = self._check(messages)
        if tools and not self.shows_tools:
            raise RequestError("tools: this model's chat template does not show tools",
                               "unsupported_value", "tools")
        if self._compiled is None:
            return _default(msgs, tools, add_generation_prompt) + prefix
        out = []
        for i, m in msgs:
            m = dict(m)
            if m["role"] in ("tool", "function"):
                if self.tool_role is None:
                    raise RequestError(f"messages[{i}]: this model's chat template does not "
                                       "show tool results", "unsupported_value",
                                       f"messages[{i}]")
                m["role"] = self.tool_role
            if m.get("tool_calls") and not self.shows_tool_calls:
                calls = "\n".join(format_call(c["function"]["name"], c["function"]["arguments"],
                                              self.call_token) for c in m["tool_calls"])
                m["content"] = _text(m["content"]) + calls
            text = _text(m["content"])
            m["content"] = [{"type": "text", "text": text}] if self.parts else text
            out.append(m)
        try:
            return self._call(out, tools, add_generation_prompt) + prefix
        except RequestError:
            raise
        except Exception as e:  # the template refused the conversation or broke on it
            raise RequestError(f"messages: the chat template failed on this conversation "
                               f"({type(e).__name__}: {e})", param="messages") from None

    def _check(self, messages: list[dict]) -> list[tuple[int, dict]]:
        """OpenAI's rules: known roles, content present except for an assistant's tool calls,
        a tool result answering an earlier call (its name looked up), developer = system."""
        if not messages:
            raise RequestError("messages: at least one message is needed", param="messages")
        calls: dict[str, str] = {}
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise RequestError(f"messages[{i}]: must be an object with a role and content, "
                                   f"got {type(m).__name__}", param=f"messages[{i}]")
            if "role" not in m:
                raise RequestError(f"messages[{i}].role: missing", param=f"messages[{i}].role")
            role = m.get("role")
            if role not in ROLES:
                raise RequestError(f"messages[{i}].role: must be one of {', '.join(ROLES)}, "
                                   f"got {role!r}", param=f"messages[{i}].role")
            m = {k: v for k, v in m.items() if v is not None}
            m.setdefault("content", None)
            if role == "developer":
                m["role"] = "system"
            if m["content"] is None and not (role == "assistant" and m.get("tool_calls")):
                raise RequestError(f"messages[{i}].content: a {role} message needs content",
                                   param=f"messages[{i}].content")
            if not _is_content(m["content"]):
                raise RequestError(f"messages[{i}].content: must be a string or a list of "
                                   f"text parts, got {type(m['content']).__name__}",
                                   param=f"messages[{i}].content")
            if m.get("tool_calls") and role != "assistant":
                raise RequestError(f"messages[{i}].tool_calls: only assistant messages make "
                                   "tool calls", param=f"messages[{i}].tool_calls")
            if m.get("tool_call_id") is not None and role != "tool":
                raise RequestError(f"messages[{i}].tool_call_id: only tool messages answer a "
                                   "tool call", param=f"messages[{i}].tool_call_id")
            for c in m.get("tool_calls") or []:
                calls[c["id"]] = c["function"]["name"]
            if role == "tool":
                cid = m.get("tool_call_id")
                if cid is None:
                    raise RequestError(f"messages[{i}].tool_call_id: a tool message needs the "
                                       "id of the call it answers",
                                       param=f"messages[{i}].tool_call_id")
                if cid not in calls:
                    raise RequestError(f"messages[{i}].tool_call_id: {cid!r} answers no tool "
                                       "call of an earlier assistant message",
                                       param=f"messages[{i}].tool_call_id")
                m.setdefault("name", calls[cid])
            if role == "function" and not m.get("name"):
                raise RequestError(f"messages[{i}].name: a function message needs the "
                                   "function's name", param=f"messages[{i}].name")
            out.append((i, m))
        return out

    def _call(self, messages, tools=None, add_generation_prompt: bool = True) -> str:
        tok = self.tokenizer

        def token_text(tid):  # the special token's own text, which decode() would skip
            if tok is None or tid is None:
                return ""
            inner = getattr(tok, "_tok", None)
            return (inner.id_to_token(tid) if inner is not None else tok.decode([tid])) or ""

        return self._compiled.render(messages=messages, tools=tools or None,
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token=token_text(getattr(tok, "bos_id", None)),
                                     eos_token=token_text(getattr(tok, "eos_id", None)))

    def _probe(self) -> None:
        def shows(messages, tools=None) -> bool:
            try:
                return _PROBE in self._call(messages, tools)
            except Exception:
                return False

        self.parts = not shows([{"role": "user", "content": _PROBE}]) and \
            shows([{"role": "user", "content": [{"type": "text", "text": _PROBE}]}])

        def c(text):
            return [{"type": "text", "text": text}] if self.parts else text

        user = {"role": "user", "content": c("hi")}
        call = {"id": "call_0", "type": "function",
                "function": {"name": "probe_fn", "arguments": "{}"}}
        asked = {"role": "assistant", "content": c(""), "tool_calls": [call]}
        if shows([user, asked, {"role": "tool", "tool_call_id": "call_0", "name": "probe_fn",
                                "content": c(_PROBE)}]):
            self.tool_role = "tool"
        elif shows([user, asked, {"role": "function", "name": "probe_fn",
                                  "content": c(_PROBE)}]):
            self.tool_role = "function"
        else:
            self.tool_role = None
        self.shows_tool_calls = shows([user, {"role": "assistant", "content": c(""),
                                              "tool_calls": [{**call, "function": {
                                                  "name": _PROBE, "arguments": "{}"}}]}])
        self.shows_tools = shows([user], [{"type": "function", "function": {
            "name": _PROBE, "description": "", "parameters": {"type": "object"}}}])


def _is_content(content) -> bool:
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("text"), str) for p in content)


def _default(messages: list[tuple[int, dict]], tools, add_generation_prompt: bool = True) -> str:
    parts = []
    for _, m in messages:
        role = "tool" if m["role"] in ("tool", "function") else m["role"]
        text = _text(m["content"])
        for c in m.get("tool_calls") or []:
            text += format_call(c["function"]["name"], c["function"]["arguments"])
        parts.append(f"<|{role}|>\n{text}\n")
    for t in tools or []:
        parts.append(f"<|functions|>\n{json.dumps(t, ensure_ascii=False)}\n")
    return "".join(parts) + ("<|assistant|>\n" if add_generation_prompt else "")


def _compile(source: str):
    try:
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise RuntimeError("the tokenizer's chat template needs jinja2 "
                           "(pip install jinja2)") from e

    class Generation(Extension):
        """transformers' `{% generation %}...{% endgeneration %}` (marks the assistant's
        tokens for training masks): rendered as its body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # as transformers: no HTML escaping, keys in the given order
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", Generation])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env.from_string(source)
