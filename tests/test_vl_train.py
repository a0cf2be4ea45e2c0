"""VL training (train/data/vl_data.py, train/vl_train.py): chats with images become ids with
each image's run of image tokens and answer-only targets; JSONL records with image paths or
data: URLs; packing into rows with cu_seqlens and the images in order; the freeze policies of
the paper's stages (stage 1 leaves the language model untouched); a few steps of the vl-demo."""

import base64
import io
import json

import pytest
import torch

pytest.importorskip("PIL")

from minimax01.tokenizer import ByteTokenizer  # noqa: E402
from minimax01.train.config_io import resolve  # noqa: E402
from minimax01.train.data.packing import IGNORE_INDEX  # noqa: E402
from minimax01.train.data.synthetic_images import make_image_example, write_image_dataset  # noqa: E402
from minimax01.train.data.vl_data import VLBatches, encode_chat, read_jsonl  # noqa: E402
from minimax01.train.vl_train import apply_freeze, frozen_parts, run_vl  # noqa: E402
from minimax01.vision import ImageProcessor, VLConfig  # noqa: E402
from minimax01.vision.chat import BOS, EOS  # noqa: E402

CFG = VLConfig.from_preset("vl-debug")
PROC = ImageProcessor.from_config(CFG)
TOK = ByteTokenizer()
IMG = CFG.image_token_index


def test_encode_chat_targets_only_the_answer():
    ex = make_image_example(3, size=56)
    chat = ex.messages()
    chat[0]["content"][0]["image"] = ex.image
    out = encode_chat(chat, TOK, PROC, IMG)
    assert out.ids.count(IMG) == PROC.num_image_tokens(56, 56) == 36
    text = TOK.decode([t for t in out.ids if t != IMG])
    assert text == (f"{BOS}user name=user\n{ex.question}{EOS}\n{BOS}ai name=assistant\n"
                    f"{ex.answer}{EOS}\n")
    trained = [t for t in out.targets if t != IGNORE_INDEX]
    assert TOK.decode(trained) == ex.answer + EOS and out.answer == ex.answer
    k = out.targets.index(trained[0])  # targets are the next tokens
    assert out.ids[k + 1] == trained[0] and out.images == [ex.image]


def test_jsonl_with_paths_and_data_urls(tmp_path):
    path = write_image_dataset(tmp_path, 3, seed=1, size=56)
    buf = io.BytesIO()
    make_image_example(9, size=56).image.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with open(path, "a") as f:
        f.write(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": "a"}]}) + "\n")
        f.write("not json\n")
    records = list(read_jsonl(path))
    assert len(records) == 4
    exs = [encode_chat(m, TOK, PROC, IMG, path.parent, w) for w, m, _ in records]
    assert all(e.ids.count(IMG) == 36 and len(e.images) == 1 for e in exs)
    assert exs[0].images[0].convert("RGB").tobytes() == make_image_example(0, 1, 56).image.tobytes()
    with pytest.raises(ValueError, match="not valid JSON"):
        list(read_jsonl(path, strict=True))
    with pytest.raises(ValueError, match=r"x: messages\[0\].content\[0\]: no image file"):
        encode_chat([{"role": "user", "content": [{"type": "image", "image": "nope.png"}]},
                     {"role": "assistant", "content": "a"}], TOK, PROC, IMG, tmp_path, "x")
    with pytest.raises(ValueError, match="no assistant answer"):
        encode_chat([{"role": "user", "content": "hi"}], TOK, PROC, IMG)
    with pytest.raises(ValueError, match="base64"):
        encode_chat([{"role": "user", "content": [{"type": "image", "image": "data:image/png;"
                                                   "base64,!!"}]},
                     {"role": "assistant", "content": "a"}], TOK, PROC, IMG)


def test_packing_rows_with_images_in_order():
    exs = []
    for i in range(7):
        e = make_image_example(i, size=56)
        chat = e.messages()
        chat[0]["content"][0]["image"] = e.image
        exs.append(encode_chat(chat, TOK, PROC, IMG))
    batches = VLBatches(iter(exs), rows=2, seq_len=400, pad_id=0)
    b = batches.next_batch()
    cu = b["cu_seqlens"].tolist()
    assert b["input_ids"].shape == (1, 800) and cu[0] == 0 and cu[-1] == 800
    n = len(b["images"])
    assert [e.images[0] for e in exs[:n]] == b["images"]
    assert int((b["input_ids"] == IMG).sum()) == 36 * n
    assert b["input_ids"][0, :len(exs[0].ids)].tolist() == exs[0].ids
    with pytest.raises(ValueError, match="does not fit train.seq_len"):
        VLBatches(iter(exs), 1, 50, 0).next_batch()


def test_freeze_policies():
    assert frozen_parts("stage1") == ("language_model",)
    assert frozen_parts("stage2") == () and frozen_parts("") == ()
    assert frozen_parts("vision_tower, projector") == ("vision_tower", "projector")
    for bad, msg in (("stage4", "DPO"), ("eyes", "unknown part"),
                     ("vision_tower,projector,language_model", "nothing would train")):
        with pytest.raises(ValueError, match=msg):
            frozen_parts(bad)
    from minimax01.vision.model import MiniMaxVLForConditionalGeneration
    model = MiniMaxVLForConditionalGeneration(CFG)
    counts = apply_freeze(model, ("language_model",))
    assert counts["language_model"] == 0 and counts["vision_tower"] > 0
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert model.image_newline.requires_grad


def test_freeze_is_refused_for_text_presets():
    cfg = resolve("debug", None, [("train.freeze", "stage1")])
    with pytest.raises(ValueError, match="only VL model presets"):
        cfg.validate()


def test_vl_demo_few_steps_stage1_trains_only_vision(tmp_path):
    from minimax01.vision.model import MiniMaxVLForConditionalGeneration
    cfg = resolve("vl-demo", None, [("train.steps", "2"), ("train.eval_batches", "2"),
                                    ("train.seq_len", "200"), ("train.log_every", "1"),
                                    ("train.freeze", "stage1"),
                                    ("train.out_dir", str(tmp_path / "run"))])
    lines = []
    result = run_vl(cfg, log=lines.append)
    assert result.step == 2 and result.loss is not None and result.loss > 0
    assert set(result.accuracy_after) == set(result.accuracy_before) and \
        "all" in result.accuracy_after
    assert any("language_model 0.000M" in line for line in lines), lines[0]
    assert any("held-out accuracy" in line and "before" in line for line in lines)
    torch.manual_seed(cfg.train.seed)  # the same initial weights as the run's
    start = MiniMaxVLForConditionalGeneration(CFG).float().state_dict()
    end = result.model.state_dict()
    lm = [k for k in start if k.startswith("language_model.")]
    assert lm and all(torch.equal(start[k], end[k]) for k in lm)
    moved = [k for k in start if k.startswith("vision_tower.") and not torch.equal(start[k], end[k])]
    assert moved and not torch.equal(start["image_newline"], end["image_newline"])
