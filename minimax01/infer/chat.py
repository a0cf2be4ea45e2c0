"""Chat messages -> prompt text: the tokenizer's own Jinja chat template (`chat_template` in
tokenizer_config.json, rendered as transformers does) or, without one, a plain default:

    <|system|>
    You are ...
    <|user|>
    Hi!
    <|assistant|>
"""

from __future__ import annotations

from datetime import datetime

ROLES = ("system", "user", "assistant", "tool")


def default_template(messages: list[dict]) -> str:
    parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
    return "".join(parts) + "<|assistant|>\n"


class ChatTemplate:
    def __init__(self, tokenizer=None, template: str | None = None):
        self.source = template or getattr(tokenizer, "chat_template", None)
        self.tokenizer = tokenizer
        self._compiled = None
        if isinstance(self.source, list):  # the named-template form: take "default"
            named = {t.get("name"): t.get("template") for t in self.source}
            self.source = named.get("default") or next(iter(named.values()), None)
        if self.source:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError as e:
                raise RuntimeError("the tokenizer's chat template needs jinja2 "
                                   "(pip install jinja2)") from e

            def raise_exception(message):
                raise ValueError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(self.source)

    @property
    def name(self) -> str:
        return "tokenizer" if self._compiled is not None else "default"

    def render(self, messages: list[dict]) -> str:
        """messages: [{"role": ..., "content": str}]. ValueError for a bad role or a template
        that rejects the conversation."""
        if not messages:
            raise ValueError("messages: at least one message is needed")
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got "
                                 f"{m.get('role')!r}")
        if self._compiled is None:
            return default_template(messages)
        tok = self.tokenizer

        def token_text(tid):  # the special token's own text, which decode() would skip
            if tok is None or tid is None:
                return ""
            inner = getattr(tok, "_tok", None)
            return (inner.id_to_token(tid) if inner is not None else tok.decode([tid])) or ""

        return self._compiled.render(messages=messages, add_generation_prompt=True,
                                     bos_token=token_text(getattr(tok, "bos_id", None)),
                                     eos_token=token_text(getattr(tok, "eos_id", None)))
