"""Chat conversations -> training tokens with a loss mask (supervised fine-tuning, DPO, GRPO).

The conversation is rendered by the checkpoint's own chat template (infer/chat.py's ChatTemplate,
the same code that renders prompts for `serve`), or MiniMax-Text-01's when the tokenizer has none,
so the model is trained on exactly the text it will be prompted with. Only the assistant's turns
are learned: for every assistant message the template is rendered up to it with the generation
prompt (the context the model will see) and through it without (the context plus the answer);
the difference, less trailing whitespace, is the answer and its end-of-turn token. Pieces are
tokenized one by one, as at inference (the prompt encoded, then the answer generated after it)."""

from __future__ import annotations

from ...infer.chat import TEXT01_TEMPLATE, ChatTemplate
from ...infer.request import RequestError

__all__ = ["ChatRenderer", "ChatError"]


class ChatError(RequestError):
    """A conversation that cannot be rendered; the message names the message index / field."""


class ChatRenderer:
    """`render(messages) -> (token_ids, loss_mask)`; `loss_mask[i]` is True where token i is an
    assistant token (content or end-of-turn), i.e. a token the model learns to predict."""

    def __init__(self, tokenizer, template: str | None = None):
        source = template or getattr(tokenizer, "chat_template", None) or TEXT01_TEMPLATE
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer, source)

    @classmethod
    def from_pretrained(cls, path) -> "ChatRenderer":
        """A checkpoint folder's tokenizer and chat template: `chat_template.jinja`, else
        `chat_template.json`, else tokenizer_config.json's `chat_template`, else Text-01's."""
        import json
        from pathlib import Path

        from ...tokenizer import load_tokenizer

        path = Path(path)
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")
                                  ).get("chat_template")
        return cls(load_tokenizer(path), template)

    def text(self, messages: list[dict], tools: list[dict] | None = None,
             add_generation_prompt: bool = False) -> str:
        """The rendered text (for inspection, and the prompt of a generation)."""
        return self._render(messages, tools, add_generation_prompt)

    def render(self, messages: list[dict], tools: list[dict] | None = None
               ) -> tuple[list[int], list[bool]]:
        if not isinstance(messages, list):
            raise ChatError(f"messages: must be a list of messages, got "
                            f"{type(messages).__name__}", param="messages")
        if tools is not None and not isinstance(tools, list):
            raise ChatError(f"tools: must be a list of tool definitions, got "
                            f"{type(tools).__name__}", param="tools")
        pieces: list[tuple[str, bool]] = []  # (text, learned)
        done = ""
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") == "assistant"):
                continue
            prompt = self._render(messages[:i], tools, True) if i else \
                self.template._call([], tools, True)  # an assistant turn first: the prompt alone
            answer = self._render(messages[:i + 1], tools, False)
            if not (prompt.startswith(done) and answer.startswith(prompt)):
                raise ChatError(f"messages[{i}]: the chat template does not render this "
                                "conversation as a growing prefix (it puts something after the "
                                "last turn, e.g. the tools), so its assistant turns cannot be "
                                "masked", param=f"messages[{i}]")
            learned = answer[len(prompt):].rstrip()
            pieces += [(prompt[len(done):], False), (learned, True)]
            done = prompt + learned
        full = self._render(messages, tools, False)
        if not full.startswith(done):
            raise ChatError("messages: the chat template does not render this conversation as "
                            "a growing prefix, so its assistant turns cannot be masked",
                            param="messages")
        pieces.append((full[len(done):], False))
        ids: list[int] = []
        mask: list[bool] = []
        for text, learned in pieces:
            if text:
                toks = self.tokenizer.encode(text)
                ids += toks
                mask += [learned] * len(toks)
        return ids, mask

    def _render(self, messages, tools, add_generation_prompt: bool) -> str:
        try:
            return self.template.render(messages, tools, add_generation_prompt=add_generation_prompt)
        except ChatError:
            raise
        except RequestError as e:
            raise ChatError(e.message, e.code, e.param) from None
