"""Image-text training data for MiniMax-VL-01: chats with images -> packed micro-batches.

A record is one chat, as a JSONL line or a synthetic example (train/data/synthetic_images.py):

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/0001.png"},
                                               {"type": "text", "text": "What colour?"}]},
                  {"role": "assistant", "content": "red"}]}

An image item is {"type": "image", "image": REF} or OpenAI's {"type": "image_url", "image_url":
{"url": REF}}; REF is a path (relative to the JSONL file's folder) or a base64 `data:` URL,
decoded by the server's own code (infer/media.py). A chat is rendered in the VL-01 template
(vision/chat.py: `<beginning_of_sentence>{header}\\n...<end_of_sentence>\\n` per turn, no BOS);
each image becomes its run of `<image>` tokens (ImageProcessor.num_image_tokens). The loss is on
the assistant's answers only (their text and `<end_of_sentence>`); everything else is -100.

Examples are packed whole into rows of `seq_len` tokens; a micro-batch is `rows` rows as one
packed sequence with `cu_seqlens` (train/data/packing.collate) plus the images of its examples,
in order: `pixel_values` (one [tiles, 3, S, S] per image) and `image_sizes`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ...infer.media import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, decode_data_url, open_image
from ...infer.request import RequestError
from .packing import IGNORE_INDEX, collate

WARN_LINES = 10


@dataclass
class VLExample:
    ids: list[int]
    targets: list[int]            # next-token targets (-100: no loss)
    images: list                  # PIL images, in prompt order
    answer: str = ""              # the last assistant answer (accuracy checks)
    task: str = ""


def load_image_ref(ref, base: Path | None, what: str):
    """A training image: a `data:` URL or a path (relative to `base`) -> PIL image (a PIL
    image, from an in-memory source, is taken as it is)."""
    if hasattr(ref, "mode") and hasattr(ref, "size"):
        return ref
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{what}: an image must be a path or a data: URL")
    try:
        if ref[:5].lower() == "data:":
            data = decode_data_url(ref, MAX_IMAGE_BYTES, what)
        else:
            path = Path(ref) if base is None or Path(ref).is_absolute() else base / ref
            if not path.is_file():
                raise ValueError(f"{what}: no image file at {path}")
            data = path.read_bytes()
        return open_image(data, MAX_IMAGE_PIXELS, what)
    except RequestError as e:
        raise ValueError(e.message) from None


def encode_chat(messages, tokenizer, processor, image_token_id: int, base: Path | None = None,
                what: str = "record") -> VLExample:
    """A chat -> ids, answer-only targets and images (ValueError naming the bad field)."""
    from ...vision.chat import BOS, EOS, HEADERS

    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{what}: 'messages' must be a non-empty list")
    ids, train, images, answer = [], [], [], ""

    def add(tokens, trained):
        ids.extend(tokens)
        train.extend([trained] * len(tokens))

    for i, m in enumerate(messages):
        where = f"{what}: messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in HEADERS:
            raise ValueError(f"{where}.role must be one of {', '.join(HEADERS)}, got {role!r}")
        content = m.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, list):
            raise ValueError(f"{where}.content must be a string or a list of items")
        is_answer = role == "assistant"
        add(tokenizer.encode(f"{BOS}{HEADERS[role]}\n", False), False)
        text = ""
        for j, item in enumerate(items):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                add(tokenizer.encode(item["text"], False), is_answer)
                text += item["text"]
            elif kind in ("image", "image_url"):
                if is_answer:
                    raise ValueError(f"{where}.content[{j}]: images belong to user turns")
                ref = item.get("image") if kind == "image" else \
                    (item.get("image_url") or {}).get("url")
                img = load_image_ref(ref, base, f"{where}.content[{j}]")
                images.append(img)
                add([image_token_id] * processor.num_image_tokens(img.height, img.width), False)
            else:
                raise ValueError(f"{where}.content[{j}] must be a text or image item")
        add(tokenizer.encode(EOS, False), is_answer)
        add(tokenizer.encode("\n", False), False)
        if is_answer:
            answer = text
    if not any(train):
        raise ValueError(f"{what}: no assistant answer to train on")
    targets = [t if k else IGNORE_INDEX for t, k in zip(ids[1:], train[1:])] + [IGNORE_INDEX]
    return VLExample(ids, targets, images, answer)


def read_jsonl(path: Path, strict: bool = False):
    """The records of a JSONL file, as (what, messages, task); a bad line is skipped with a
    warning naming it (an error with `strict`)."""
    bad = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            what = f"{path}:{n}"
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "messages" not in rec:
                    raise ValueError(f"{what}: a record needs 'messages'")
            except ValueError as e:
                bad += 1
                if strict:
                    raise ValueError(str(e) if str(e).startswith(what) else
                                     f"{what}: not valid JSON ({e})") from None
                if bad <= WARN_LINES:
                    print(f"warning: {what}: skipped (not a chat record; {bad} so far)",
                          file=sys.stderr)
                continue
            yield what, rec["messages"], str(rec.get("task", ""))


class VLBatches:
    """Examples -> micro-batches of `rows` packed rows of `seq_len` tokens with their images.
    `examples` is an iterator of VLExample; an example longer than `seq_len` is an error."""

    def __init__(self, examples, rows: int, seq_len: int, pad_id: int):
        self.examples, self.rows, self.seq_len, self.pad_id = iter(examples), rows, seq_len, pad_id
        self.pending = None

    def _row(self):
        ids, targets, lengths, images = [], [], [], []
        while True:
            ex = self.pending if self.pending is not None else next(self.examples, None)
            self.pending = None
            if ex is None:
                break
            if len(ex.ids) > self.seq_len:
                raise ValueError(f"an example of {len(ex.ids)} tokens (with its image tokens) "
                                 f"does not fit train.seq_len={self.seq_len}")
            if len(ids) + len(ex.ids) > self.seq_len:
                self.pending = ex
                break
            ids += ex.ids
            targets += ex.targets
            lengths.append(len(ex.ids))
            images += ex.images
        if not ids:
            return None
        pad = self.seq_len - len(ids)
        if pad:
            ids += [self.pad_id] * pad
            targets += [IGNORE_INDEX] * pad
            lengths.append(pad)
        return (ids, targets, lengths), images

    def next_batch(self) -> dict | None:
        rows, images = [], []
        for _ in range(self.rows):
            row = self._row()
            if row is None:
                break
            rows.append(row[0])
            images += row[1]
        if not rows:
            return None
        batch = collate(rows)
        batch["images"] = images
        return batch
