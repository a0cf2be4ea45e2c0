"""Serving MiniMax-VL-01 (tiny `vl-debug` model): the engine packs each request's image features
into the varlen prefill at its `<image>` tokens - greedy output equals generate() with the same
images, also when a prompt's image tokens are split over several prefill chunks and when
several requests with images share one packed prefill; text-only requests to a VL model work;
and through the HTTP server with the official openai SDK: data: URLs and allowed local files
give generate()'s text, every bad image is a 400 naming the part, never a 5xx."""

import base64
import io
import random

import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from minimax01 import generate  # noqa: E402
from minimax01.infer.engine import Engine  # noqa: E402
from minimax01.infer.request import RequestError, SamplingParams  # noqa: E402
from minimax01.tokenizer import ByteTokenizer  # noqa: E402
from minimax01.train.data.synthetic_images import make_image_example  # noqa: E402
from minimax01.vision import ImageProcessor, VLConfig  # noqa: E402
from minimax01.vision.model import MiniMaxVLForConditionalGeneration  # noqa: E402

N = 6
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def vl():
    torch.manual_seed(0)
    model = MiniMaxVLForConditionalGeneration(VLConfig.from_preset("vl-debug")).eval()
    return model, ImageProcessor.from_config(model.config), ByteTokenizer()


def expand(tok, proc, text_before, images, text_after, token=259):
    """prompt ids: text, each image's run of image tokens, text."""
    ids = tok.encode(text_before, add_bos=True)
    for im in images:
        ids += [token] * proc.num_image_tokens(im.height, im.width)
    return ids + tok.encode(text_after)


def reference(model, proc, ids, images):
    """generate() with the same images: the continuation's ids."""
    px = proc(images) if images else {"pixel_values": None, "image_sizes": None}
    out = generate(model, [ids], max_new_tokens=N, pixel_values=px["pixel_values"],
                   image_sizes=px["image_sizes"])
    return out[0, len(ids):].tolist()


def pictures(*sizes):
    return [make_image_example(i, seed=5, size=64).image.resize(s) for i, s in enumerate(sizes)]


def test_engine_equals_generate_with_images_chunked_and_packed(vl):
    model, proc, tok = vl
    prompts = [(pictures((64, 64)), "What is it?"),
               (pictures((100, 30), (56, 56)), "Compare."),
               ([], "text only"),
               (pictures((30, 100)), "")]
    ids = [expand(tok, proc, "Look: ", ims, q) for ims, q in prompts]
    want = [reference(model, proc, i, ims) for i, (ims, _) in zip(ids, prompts)]
    for chunk in (512, 23):  # everything in one pass; image runs cut across chunks
        engine = Engine(model, tok, num_slots=4, max_context=512, prefill_chunk=chunk)
        try:
            got = engine.generate(ids, GREEDY, images=[ims for ims, _ in prompts])
        finally:
            engine.close()
        assert [c.token_ids for c in got] == want, chunk
        assert all(c.error is None for c in got)


def test_engine_refuses_mismatched_images(vl):
    model, proc, tok = vl
    engine = Engine(model, tok, num_slots=2, max_context=512)
    try:
        ims = pictures((64, 64))
        ids = expand(tok, proc, "a", ims, "b")
        with pytest.raises(RequestError, match="image token"):
            engine.add_request(ids[:-3] + ids[-2:] + [259], GREEDY, images=ims * 2)
        with pytest.raises(RequestError, match="image token"):
            engine.add_request(ids, GREEDY)  # image tokens but no image
        with pytest.raises(RequestError, match="has zero size|no image file|image 0"):
            engine.add_request(ids, GREEDY, images=["/nonexistent.png"])
    finally:
        engine.close()
    text = Engine(model.language_model, tok, num_slots=1, max_context=64)
    with pytest.raises(RequestError, match="does not take images"):
        text.add_request(tok.encode("a"), GREEDY, images=pictures((8, 8)))
    text.close()
