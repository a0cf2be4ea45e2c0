"""The synthetic image data (train/data/synthetic_images.py): deterministic by seed, and every
answer can be read back from the pixels (colour, connected components, centroid, fill ratio)."""

import json
from collections import Counter

import pytest

pytest.importorskip("PIL")

from minimax01.train.data.synthetic_images import (BACKGROUND, COLORS, IMAGE_TASKS,  # noqa: E402
                                                   QUADRANTS, make_image_example,
                                                   write_image_dataset)

N = 120


def ink(image):
    w, h = image.size
    px = image.load()
    return {(x, y): px[x, y] for y in range(h) for x in range(w) if px[x, y] != BACKGROUND}


def components(points) -> list[set]:
    left, out = set(points), []
    while left:
        todo, comp = [left.pop()], set()
        while todo:
            x, y = todo.pop()
            comp.add((x, y))
            for q in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if q in left:
                    left.remove(q)
                    todo.append(q)
        out.append(comp)
    return out


def test_deterministic_by_seed_and_index():
    a, b = make_image_example(7, seed=3), make_image_example(7, seed=3)
    assert a.image.tobytes() == b.image.tobytes() and (a.question, a.answer) == (b.question,
                                                                                   b.answer)
    others = [make_image_example(7, seed=4), make_image_example(8, seed=3)]
    assert all(o.image.tobytes() != a.image.tobytes() for o in others)


def test_every_task_and_answer_occurs():
    exs = [make_image_example(i, size=48) for i in range(N)]
    assert {e.task for e in exs} == set(IMAGE_TASKS)
    assert all(e.image.mode == "RGB" and e.image.size == (48, 48) for e in exs)
    counts = Counter(e.answer for e in exs if e.task == "count")
    assert set(counts) == {"1", "2", "3", "4"}
    only = [make_image_example(i, tasks=("position",)) for i in range(40)]
    assert {e.task for e in only} == {"position"} and {e.answer for e in only} == set(QUADRANTS)


@pytest.mark.parametrize("size", [32, 64])
def test_answers_match_the_pixels(size):
    for i in range(N):
        e = make_image_example(i, seed=1, size=size)
        points = ink(e.image)
        assert points, f"example {i} drew nothing"
        if e.task == "text":
            assert e.answer in e.caption and len(e.answer) == 1
            continue
        colors = set(points.values())
        assert len(colors) == 1, (i, colors)  # shapes are drawn without anti-aliasing
        color = next(iter(colors))
        comps = components(points)
        if e.task == "count":
            assert len(comps) == int(e.answer), (i, e.caption)
            continue
        assert len(comps) == 1
        name = next(n for n, c in COLORS.items() if c == color)
        assert name in e.caption
        if e.task == "color":
            assert e.answer == name
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if e.task == "position":
            cx, cy = sum(xs) / len(xs), sum(ys) / len(ys)
            quadrant = 2 * (cy >= size / 2) + (cx >= size / 2)
            assert e.answer == QUADRANTS[quadrant], (i, cx, cy)
        if e.task == "shape":
            fill = len(points) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
            expect = {"square": 1.0, "circle": 0.785, "triangle": 0.5}[e.answer]
            assert abs(fill - expect) < 0.12, (i, e.answer, fill)


def test_messages_and_dataset_files(tmp_path):
    e = make_image_example(0)
    m = e.messages()
    assert m[0]["role"] == "user" and m[0]["content"][0] == {"type": "image"}
    assert m[0]["content"][1]["text"] == e.question and m[1]["content"] == e.answer
    assert e.messages(caption=True)[1]["content"] == e.caption
    path = write_image_dataset(tmp_path, 6, seed=2, size=32, caption_fraction=0.5)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 6
    for i, rec in enumerate(lines):
        ref = rec["messages"][0]["content"][0]["image"]
        from PIL import Image
        with Image.open(tmp_path / ref) as im:
            assert im.convert("RGB").tobytes() == make_image_example(i, 2, 32).image.tobytes()
    answers = [rec["messages"][1]["content"] for rec in lines]
    assert any(a == make_image_example(i, 2, 32).caption for i, a in enumerate(answers))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown image task"):
        make_image_example(0, tasks=("colour",))
    with pytest.raises(ValueError, match="size >= 16"):
        make_image_example(0, size=8)
