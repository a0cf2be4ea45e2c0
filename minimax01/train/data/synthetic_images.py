"""Synthetic images with questions about them (Pillow), deterministic by (seed, index): the test
data of the vision-language model and the images of the CPU demo (`train --preset vl-demo`).

Every image is a plain white canvas with coloured shapes or a rendered character; each example
asks one question whose answer is one short word, so accuracy is an exact-match count:

    color     one shape                    "What colour is the shape?"        -> "red"
    shape     one shape                    "What shape is this?"              -> "circle"
    count     1-4 shapes of one kind       "How many shapes are there?"      -> "3"
    position  one shape in one quadrant    "Where is the shape?"              -> "top left"
    text      one character                "What character is written?"       -> "K"

`caption` describes the whole image ("3 green squares"): the caption-style data of stage I
(modality alignment). Shapes never overlap (one per cell of a grid), so the answers can be read
back from the pixels (tests/test_synthetic_images.py does)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

IMAGE_TASKS = ("color", "shape", "count", "position", "text")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
          "yellow": (235, 200, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
          "black": (20, 20, 20), "cyan": (20, 190, 210)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
CHARACTERS = "ABCDEFGHKMNPRSTUVXYZ2345789"  # no look-alikes (O/0, I/1, ...)
BACKGROUND = (255, 255, 255)
QUESTIONS = {
    "color": ("What colour is the shape?", "Which colour does the shape have?"),
    "shape": ("What shape is this?", "Which shape is drawn?"),
    "count": ("How many shapes are there?", "Count the shapes."),
    "position": ("Where is the shape?", "In which corner is the shape?"),
    "text": ("What character is written?", "Read the character."),
}


@dataclass(frozen=True)
class ImageExample:
    task: str
    image: object          # PIL.Image.Image, RGB
    question: str
    answer: str
    caption: str

    def messages(self, image_ref: str | None = None, caption: bool = False) -> list[dict]:
        """The example as a chat: the user sends the image then the question (or asks for a
        description when `caption`), the assistant answers. The image part is
        {"type": "image"} or, with `image_ref` (a path or data: URL), {"type": "image",
        "image": image_ref} - the training JSONL's form (train/data/vl_data.py)."""
        part = {"type": "image"} if image_ref is None else {"type": "image", "image": image_ref}
        ask, answer = ("Describe the image.", self.caption) if caption else \
            (self.question, self.answer)
        return [{"role": "user", "content": [part, {"type": "text", "text": ask}]},
                {"role": "assistant", "content": answer}]


def make_image_example(index: int, seed: int = 0, size: int = 64,
                       tasks: tuple[str, ...] = IMAGE_TASKS) -> ImageExample:
    """Example number `index`: the same pixels, question and answer on every run for the same
    arguments (and Pillow version). The task is drawn from `tasks`."""
    from PIL import Image, ImageDraw

    bad = [t for t in tasks if t not in IMAGE_TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown image task(s) {bad or tasks!r}; available: "
                         f"{', '.join(IMAGE_TASKS)}")
    if size < 16:
        raise ValueError(f"synthetic images need size >= 16 pixels, got {size}")
    rng = random.Random(f"minimax01-synthetic-images/{seed}/{index}")
    task = rng.choice(tasks)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    color = rng.choice(sorted(COLORS))
    shape = rng.choice(SHAPES)
    question = rng.choice(QUESTIONS[task])
    if task == "text":
        char = rng.choice(CHARACTERS)
        _character(draw, rng, size, char, COLORS[color])
        return ImageExample(task, image, question, char, f"the character {char}")
    if task == "count":
        count = rng.randint(1, 4)
        cells = rng.sample(range(9), count)  # a 3x3 grid: one shape per cell
        for c in cells:
            _shape(draw, rng, shape, COLORS[color], _cell(size, 3, c // 3, c % 3))
        noun = shape if count == 1 else f"{shape}s"
        return ImageExample(task, image, question, str(count), f"{count} {color} {noun}")
    quadrant = rng.randrange(4)
    _shape(draw, rng, shape, COLORS[color], _cell(size, 2, quadrant // 2, quadrant % 2))
    answer = {"color": color, "shape": shape, "position": QUADRANTS[quadrant]}[task]
    article = "an" if color[0] in "aeiou" else "a"
    return ImageExample(task, image, question, answer,
                        f"{article} {color} {shape} in the {QUADRANTS[quadrant]}")


def _cell(size: int, n: int, row: int, col: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of cell (row, col) of an n x n grid, with a margin."""
    step = size / n
    m = max(1, int(step * 0.12))
    return (int(col * step) + m, int(row * step) + m, int((col + 1) * step) - m,
            int((row + 1) * step) - m)


def _shape(draw, rng: random.Random, shape: str, color, box) -> None:
    """A shape of 60-100% of the box's side, at a random place inside it."""
    x0, y0, x1, y1 = box
    side = min(x1 - x0, y1 - y0)
    s = max(4, int(side * rng.uniform(0.6, 1.0)))
    x = x0 + rng.randint(0, x1 - x0 - s)
    y = y0 + rng.randint(0, y1 - y0 - s)
    if shape == "circle":
        draw.ellipse((x, y, x + s - 1, y + s - 1), fill=color)
    elif shape == "square":
        draw.rectangle((x, y, x + s - 1, y + s - 1), fill=color)
    else:
        draw.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=color)


def _character(draw, rng: random.Random, size: int, char: str, color) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default(size=max(8, int(size * rng.uniform(0.5, 0.7))))
    x0, y0, x1, y1 = draw.textbbox((0, 0), char, font=font)
    w, h = x1 - x0, y1 - y0
    x = rng.randint(0, max(0, size - w)) - x0
    y = rng.randint(0, max(0, size - h)) - y0
    draw.text((x, y), char, fill=color, font=font)


def write_image_dataset(out_dir: str | Path, num: int, seed: int = 0, size: int = 64,
                        tasks: tuple[str, ...] = IMAGE_TASKS, caption_fraction: float = 0.0,
                        start: int = 0) -> Path:
    """Write examples start..start+num-1 as PNG files plus `data.jsonl` (one chat per line,
    image paths relative to the folder) - the training JSONL format of docs/vision.md. A share
    `caption_fraction` of them asks for the caption instead of the question. Returns the JSONL
    path."""
    import json

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"minimax01-synthetic-images/captions/{seed}")
    path = out / "data.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, start + num):
            ex = make_image_example(i, seed, size, tasks)
            name = f"images/{i:06d}.png"
            ex.image.save(out / name)
            caption = rng.random() < caption_fraction
            record = {"task": ex.task, "messages": ex.messages(name, caption)}
            f.write(json.dumps(record) + "\n")
    return path
