"""MiniMax-VL-01 checkpoints: the released tensor names (VL01.md §7), round trips in one file and
sharded (with an index), both LM dialects, a released-style config.json, every bad tensor named
at once, no pickles; `generate --image` and `info --preset minimax-vl-01` on the command line."""

import json
import pytest
import torch
from PIL import Image

from minimax01 import MiniMaxVLForConditionalGeneration
from minimax01.checkpoint import CheckpointError
from minimax01.vision import VLConfig

CFG = VLConfig.from_preset("vl-debug")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxVLForConditionalGeneration(CFG).eval()


def read_names(folder):
    from safetensors import safe_open

    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    return names


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_released_tensor_names(model, tmp_path):
    model.save_pretrained(tmp_path)
    names = read_names(tmp_path)
    v = "vision_tower.vision_model."
    for n in ["image_newline", "multi_modal_projector.linear_1.weight",
              "multi_modal_projector.linear_2.bias", v + "embeddings.class_embedding",
              v + "embeddings.patch_embedding.weight", v + "embeddings.position_embedding.weight",
              v + "pre_layrnorm.weight", v + "encoder.layers.1.self_attn.out_proj.bias",
              v + "encoder.layers.0.layer_norm2.weight", v + "encoder.layers.1.mlp.fc2.bias",
              "language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
              "language_model.lm_head.weight",
              "language_model.model.layers.0.block_sparse_moe.experts.3.w2.weight",
              "language_model.model.layers.0.self_attn.qkv_proj.weight",
              "language_model.model.layers.1.self_attn.q_proj.weight"]:
        assert n in names, n
    assert not any("post_layernorm" in n or n.endswith("patch_embedding.bias") for n in names)
    assert all(n.startswith(("vision_tower.vision_model.", "multi_modal_projector.linear_",
                             "language_model.model.", "language_model.lm_head.")) or
               n == "image_newline" for n in names)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "minimax_vl_01" and cfg["image_token_index"] == 259
    assert cfg["text_config"]["model_type"] == "MiniMaxText01"
    assert cfg["vision_config"]["hidden_act"] == "gelu" and cfg["vision_feature_layer"] == -1


@pytest.mark.parametrize("dialect,shard", [("legacy", "2GB"), ("legacy", "60KB"), ("hf", "60KB")])
def test_round_trip(model, tmp_path, dialect, shard):
    files = model.save_pretrained(tmp_path, dialect=dialect, max_shard_size=shard)
    assert (len(files) > 1) == (shard == "60KB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (len(files) > 1)
    back = MiniMaxVLForConditionalGeneration.from_pretrained(tmp_path)
    assert same(model, back) and back.config == model.config
    half = MiniMaxVLForConditionalGeneration.from_pretrained(tmp_path, dtype="bfloat16")
    assert half.vision_tower.vision_model.pre_layrnorm.weight.dtype == torch.bfloat16
    slope = half.language_model.model.layers[0].self_attn.slope
    assert slope.dtype == torch.float32 and not slope.is_meta


def test_released_style_config_is_read(model, tmp_path):
    """The released config.json carries CLIP / LLaVA keys we do not use, and its dtype at the top."""
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision_config"].update(projection_dim=768, vision_use_head=False, dropout=0.0)
    cfg["text_config"].pop("torch_dtype", None)
    cfg["text_config"].pop("dtype", None)
    cfg.update(torch_dtype="float32", transformers_version="4.42.3",
               auto_map={"AutoConfig": "configuration_minimax_vl_01.MiniMaxVL01Config"})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = MiniMaxVLForConditionalGeneration.from_pretrained(tmp_path)
    assert same(model, back)


def test_bad_checkpoints_name_every_tensor(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["image_newline"]
    del state["vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias"]
    state["multi_modal_projector.linear_1.weight"] = torch.zeros(3, 3)
    state["vision_tower.vision_model.post_layernorm.weight"] = torch.zeros(32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        MiniMaxVLForConditionalGeneration.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "2 missing" in msg and "image_newline" in msg and "layers.1.mlp.fc1.bias" in msg
    assert "post_layernorm" in msg and "linear_1.weight (shape [3, 3]" in msg
    (tmp_path / "model.safetensors").unlink()
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        MiniMaxVLForConditionalGeneration.from_pretrained(tmp_path)


def test_text_checkpoint_is_not_a_vl_one(tmp_path):
    from minimax01 import MiniMaxForCausalLM

    MiniMaxForCausalLM(CFG.text_config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="expected 'minimax_vl_01'"):
        MiniMaxVLForConditionalGeneration.from_pretrained(tmp_path)


def run_cli(capsys, *argv):
    from minimax01.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_cli_with_images(model, tmp_path, capsys):
    """The CLI's images give what generate() gives with the processor's pixels."""
    from minimax01 import generate
    from minimax01.tokenizer import load_tokenizer
    from minimax01.vision import ImageProcessor, encode_with_images

    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    a, b = Image.new("RGB", (90, 40), (200, 30, 30)), Image.new("RGB", (20, 70), (30, 30, 200))
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    prompt = "<image>and<image>?"
    code, out, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", prompt,
                             "--image", tmp_path / "a.png", "--image", tmp_path / "b.png",
                             "--max-new-tokens", "3")
    assert code == 0, err
    proc = ImageProcessor.from_config(CFG)
    batch = proc([a, b])
    tok = load_tokenizer(ckpt)
    ids = encode_with_images(tok, prompt, batch["image_sizes"], proc, CFG.image_token_index,
                             add_bos=True)
    assert f"[{len(ids)} prompt + " in err
    want = generate(model, [ids], max_new_tokens=3, stop_tokens=[tok.eos_id], **batch)
    new = want[0, len(ids):].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    assert out[:-1] == tok.decode(new)

    code, _, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "<image>x",
                           "--image", tmp_path / "a.png", "--image", tmp_path / "b.png")
    assert code == 2 and "1 <image> placeholder(s) for 2 --image" in err
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    code, _, err = run_cli(capsys, "generate", "--checkpoint", ckpt, "--prompt", "x",
                           "--image", tmp_path / "bad.png")
    assert code == 2 and f"--image {tmp_path / 'bad.png'} is not a readable image" in err
    assert len(err.strip().splitlines()) == 1


def test_text_checkpoint_refuses_images(tmp_path, capsys):
    from minimax01 import MiniMaxForCausalLM

    MiniMaxForCausalLM(CFG.text_config).save_pretrained(tmp_path)
    Image.new("RGB", (9, 9)).save(tmp_path / "a.png")
    code, _, err = run_cli(capsys, "generate", "--checkpoint", tmp_path, "--prompt", "x",
                           "--image", tmp_path / "a.png")
    assert code == 2 and "is a text model" in err


def test_info_vl(model, tmp_path, capsys):
    code, out, err = run_cli(capsys, "info", "--preset", "minimax-vl-01")
    assert code == 0, err
    assert "vision_tower              303.51M" in out and "multi_modal_projector      44.05M" in out
    assert "1000x2000                 3x6         19  11,088" in out  # the largest grid
    assert "336x336                   1x1          2   1,176" in out
    assert "Language model" in out and "80 (70 lightning + 10 softmax)" in out
    model.save_pretrained(tmp_path)
    code, out, err = run_cli(capsys, "info", "--checkpoint", tmp_path)
    assert code == 0, err
    assert "legacy dialect" in out and "MiniMax-VL-01 parts" in out
    code, _, err = run_cli(capsys, "info", "--preset", "vl-nope")
    assert code == 2 and "vision-language presets: vl-debug, minimax-vl-01" in err
