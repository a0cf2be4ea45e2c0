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


# ---------------------------------------------------------------------------- over HTTP
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from server_utils import running  # noqa: E402

from minimax01.infer.chat import ChatTemplate  # noqa: E402
from minimax01.infer.detok import TextStream  # noqa: E402
from minimax01.infer.media import MediaPolicy  # noqa: E402
from minimax01.infer.server import create_app  # noqa: E402


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def part(url):
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def server(vl, tmp_path_factory):
    model, proc, tok = vl
    media_dir = tmp_path_factory.mktemp("media")
    engine = Engine(model, tok, num_slots=3, max_context=1024, prefill_chunk=64)
    policy = MediaPolicy(max_image_pixels=300 * 300, max_images=3,
                         allowed_local_path=str(media_dir))
    app = create_app(engine, tok, model_name="vl", media=policy)
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        yield client, url, media_dir
    engine.close()


def expected(vl, text_before, images, text_after):
    """What the server must answer: the default chat template around the images, then
    generate() with them, detokenized as a stream."""
    model, proc, tok = vl
    prompt = ChatTemplate(tok).render([{"role": "user", "content": text_before + "\0" +
                                        text_after}])
    before, after = prompt.split("\0")
    ids = expand(tok, proc, before, images, after)
    stream = TextStream(tok)
    return "".join(stream.push(t) for t in reference(model, proc, ids, images)) + stream.finish()


def ask(client, content, **kw):
    r = client.chat.completions.create(model="vl", messages=[{"role": "user", "content": content}],
                                       max_tokens=N, temperature=0, extra_body={"ignore_eos": True},
                                       **kw)
    return r


def test_images_through_the_sdk_equal_generate(server, vl):
    client, url, media_dir = server
    img = pictures((64, 64))[0]
    want = expected(vl, "", [img], "What colour?")
    content = [part(data_url(png(img))), {"type": "text", "text": "What colour?"}]
    r = ask(client, content)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens > 88  # the image's 88 tokens are counted
    stream = ask(client, content, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    (media_dir / "a.png").write_bytes(png(img))
    local = [part(f"file://{media_dir}/a.png"), {"type": "text", "text": "What colour?"}]
    assert ask(client, local).choices[0].message.content == want
    two = pictures((30, 100), (56, 56))
    content = [{"type": "text", "text": "A"}, part(data_url(png(two[0]))),
               {"type": "text", "text": "B"}, part(data_url(png(two[1])))]
    model, proc, tok = vl  # layout: text, image, text, image
    prompt = ChatTemplate(tok).render([{"role": "user", "content": "A\0B\0"}])
    p0, p1, p2 = prompt.split("\0")
    ids = expand(tok, proc, p0, two[:1], p1) + expand(tok, proc, "", two[1:], p2)[1:]
    stream = TextStream(tok)
    want2 = "".join(stream.push(t) for t in reference(model, proc, ids, two)) + stream.finish()
    assert ask(client, content).choices[0].message.content == want2


def test_text_only_requests_to_a_vl_model(server, vl):
    client, *_ = server
    assert ask(client, "Hello there").choices[0].message.content == \
        expected(vl, "Hello there", [], "")


def bad(client, messages, param, code, fragment=""):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="vl", messages=messages, max_tokens=2)
    body = e.value.body
    assert e.value.status_code == 400 and body["param"] == param and body["code"] == code, body
    assert fragment in body["message"], body["message"]


def test_bad_images_are_400s_naming_the_part(server, tmp_path):
    client, url, media_dir = server
    ok = data_url(png(pictures((20, 20))[0]))
    P = "messages[0].content[1].image_url"

    def user(url_):
        return [{"role": "user", "content": [{"type": "text", "text": "x"}, part(url_)]}]

    bad(client, user("https://example.com/a.png"), P, "unsupported_value", "network")
    bad(client, user("data:image/png;base64,!!!"), P, "invalid_image", "base64")
    bad(client, user(data_url(png(pictures((64, 64))[0])[:100])), P, "invalid_image")
    bad(client, user(data_url(b"GIF89a not really")), P, "invalid_image")
    bad(client, user(data_url(png(Image.new("RGB", (301, 300))))), P, "image_too_large",
        "301x300")
    (tmp_path / "outside.png").write_bytes(png(pictures((20, 20))[0]))
    bad(client, user(f"file://{tmp_path}/outside.png"), P, "unsupported_value", "outside")
    bad(client, [{"role": "user", "content": [part(ok)] * 4}], "messages", "too_many_images")
    bad(client, [{"role": "user", "content": "hi"},
                 {"role": "assistant", "content": [part(ok)]}],
        "messages[1].content[0].image_url", "invalid_value", "only user messages")
    # token ids that claim images no request sent
    r = httpx.post(f"{url}/v1/completions", json={"model": "vl", "prompt": [1, 259, 259, 2],
                                                  "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_fuzzed_image_requests_never_give_a_5xx(server):
    client, url, media_dir = server
    rng = random.Random(0)
    good = png(pictures((40, 24))[0])
    statuses = []
    for i in range(40):
        data = bytearray(good)
        for _ in range(rng.randint(0, 6)):
            k = rng.randrange(len(data))
            data[k:k + rng.randint(0, 4)] = bytes(rng.randrange(256) for _ in range(
                rng.randint(0, 4)))
        u = data_url(bytes(data))
        if i % 5 == 1:
            u = u[: rng.randrange(len(u))]
        elif i % 5 == 2:
            u = u.replace("base64", rng.choice(["base46", "", "base64;x"]), 1)
        content = rng.choice([[part(u)], [part(u), {"type": "text", "text": "q"}],
                              [{"type": "image_url", "image_url": {"url": u, "detail": "low"}}]])
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "vl", "messages": [{"role": "user", "content": content}], "max_tokens": 1})
        assert r.status_code < 500, r.text
        if r.status_code != 200:
            assert r.json()["error"]["param"].startswith("messages"), r.text
        statuses.append(r.status_code)
    assert 200 in statuses and 400 in statuses, statuses


def test_serve_command_detects_a_vl_checkpoint(vl, tmp_path):
    from server_utils import serve_process
    model, proc, tok = vl
    ckpt = tmp_path / "tiny-vl"
    model.save_pretrained(ckpt, tokenizer=tok)
    img = pictures((64, 64))[0]
    want = expected(vl, "", [img], "Which colour?")
    with serve_process(ckpt, "--max-context", "512", "--num-slots", "2", "--device", "cpu",
                       "--dtype", "float32", "--log-level", "warning") as (proc_, url):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-vl", "max_tokens": N, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                part(data_url(png(img))), {"type": "text", "text": "Which colour?"}]}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
