"""The VL-01 prompt (VL01.md §6, §8): rendering chat messages whose content mixes image and text
items, and expanding each image's single `<image>` placeholder into as many `<image>` tokens as
that image has feature tokens (the released processor does this in the text)."""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"
BOS, EOS = "<beginning_of_sentence>", "<end_of_sentence>"
HEADERS = {"system": "system ai_setting=assistant", "user": "user name=user",
           "assistant": "ai name=assistant"}
IMAGE_TYPES = ("image", "image_url")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The VL-01 chat template for system / user / assistant turns: content is a string or a list
    of {"type": "text", "text": ...} and image items ({"type": "image"} or "image_url"), an image
    rendering as one `<image>`."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in HEADERS:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(HEADERS)}, got "
                             f"{role!r}")
        content = m.get("content", "")
        if isinstance(content, str):
            body = content
        elif isinstance(content, list):
            parts = []
            for j, item in enumerate(content):
                kind = item.get("type") if isinstance(item, dict) else None
                if kind in IMAGE_TYPES:
                    parts.append(IMAGE_PLACEHOLDER)
                elif kind == "text" and isinstance(item.get("text"), str):
                    parts.append(item["text"])
                else:
                    raise ValueError(f"messages[{i}].content[{j}] must be a text or image item")
            body = "".join(parts)
        else:
            raise ValueError(f"messages[{i}].content must be a string or a list of items")
        out.append(f"{BOS}{HEADERS[role]}\n{body}{EOS}\n")
    if add_generation_prompt:
        out.append(f"{BOS}{HEADERS['assistant']}\n")
    return "".join(out)


def _counts(image_sizes, processor) -> list[int]:
    return [processor.num_image_tokens(int(h), int(w)) for h, w in image_sizes]


def expand_image_placeholders(text: str, image_sizes, processor) -> str:
    """Each `<image>` of `text` (one per image, in order) repeated num_image_tokens times."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(image_sizes):
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) "
                         f"for {len(image_sizes)} image(s)")
    out = [pieces[0]]
    for n, piece in zip(_counts(image_sizes, processor), pieces[1:]):
        out.append(IMAGE_PLACEHOLDER * n + piece)
    return "".join(out)


def expand_image_ids(ids: Sequence[int], image_sizes, processor, image_token_id: int) -> list[int]:
    """Token-level expansion: each `image_token_id` of `ids` (one per image) repeated."""
    ids = [int(t) for t in ids]
    where = [k for k, t in enumerate(ids) if t == image_token_id]
    if len(where) != len(image_sizes):
        raise ValueError(f"the prompt has {len(where)} image token(s) ({image_token_id}) for "
                         f"{len(image_sizes)} image(s)")
    out, start = [], 0
    for k, n in zip(where, _counts(image_sizes, processor)):
        out += ids[start:k] + [image_token_id] * n
        start = k + 1
    return out + ids[start:]


def encode_with_images(tokenizer, text: str, image_sizes, processor, image_token_id: int,
                       add_bos: bool = False, placeholder: str = IMAGE_PLACEHOLDER) -> list[int]:
    """Token ids of a prompt whose `<image>` placeholders (one per image, in order) become the
    expanded image tokens; without any placeholder the images go first. Text pieces are encoded
    on their own, so this works whether or not the tokenizer knows `<image>` as a token. (The
    server passes a one-off `placeholder`, so that no user text can stand for an image.)"""
    if placeholder not in text:
        text = placeholder * len(image_sizes) + text
    pieces = text.split(placeholder)
    ids = tokenizer.encode(pieces[0], add_bos=add_bos) if pieces[0] or add_bos else []
    for piece in pieces[1:]:
        ids += [image_token_id] + (tokenizer.encode(piece) if piece else [])
    return expand_image_ids(ids, image_sizes, processor, image_token_id)
