"""HF-format checkpoints: both dialects, sharding, conversion, dtype/device, meta loading, and one
clear error for every kind of broken checkpoint."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.checkpoint import CheckpointError, CheckpointReader, convert_checkpoint
from minimax01.checkpoint.writer import parse_size
from minimax01.tokenizer import ByteTokenizer, load_tokenizer

DIALECTS = ("legacy", "hf")


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug", **overrides)).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def tensor_names(path):
    names = []
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                names += list(h.keys())
    return names


def snapshot(path):
    return {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in sorted(os.listdir(path))}


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dialect", DIALECTS)
def test_round_trip_identical_tensors_and_logits(tmp_path, model, tokens, logits, dialect):
    model.save_pretrained(tmp_path, dialect=dialect)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == ("MiniMaxText01" if dialect == "legacy" else "minimax")
    names = tensor_names(tmp_path)
    if dialect == "legacy":
        assert "model.layers.3.block_sparse_moe.experts.2.w3.weight" in names
        assert not any(".mlp." in n for n in names)
    else:
        assert "model.layers.3.mlp.experts.gate_up_proj" in names
        assert not any("block_sparse_moe" in n for n in names)
    loaded = MiniMaxForCausalLM.from_pretrained(tmp_path)
    assert_same_model(model, loaded)
    assert not loaded.training
    for a, b in zip(model.model.layers, loaded.model.layers):
        if a.layer_type == "linear_attention":
            assert torch.equal(a.self_attn.slope, b.self_attn.slope)
            assert b.self_attn.slope.dtype == torch.float32 and not b.self_attn.slope.is_meta
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, logits)


def test_legacy_tensors_are_the_expert_slices(tmp_path, model):
    """SPEC §6: w1 = gate_up_proj[e, :I], w3 = gate_up_proj[e, I:], w2 = down_proj[e]."""
    model.save_pretrained(tmp_path, dialect="legacy")
    stored = load_file(tmp_path / "model.safetensors")
    i = model.config.intermediate_size
    for layer in (0, 3):
        experts = model.model.layers[layer].mlp.experts
        prefix = f"model.layers.{layer}.block_sparse_moe"
        assert torch.equal(stored[f"{prefix}.gate.weight"], model.model.layers[layer].mlp.gate.weight)
        for e in range(model.config.num_local_experts):
            assert torch.equal(stored[f"{prefix}.experts.{e}.w1.weight"], experts.gate_up_proj[e, :i])
            assert torch.equal(stored[f"{prefix}.experts.{e}.w3.weight"], experts.gate_up_proj[e, i:])
            assert torch.equal(stored[f"{prefix}.experts.{e}.w2.weight"], experts.down_proj[e])


@pytest.mark.parametrize("dialect", DIALECTS)
def test_sharding_writes_index_and_respects_size(tmp_path, model, dialect):
    limit = 100_000
    model.save_pretrained(tmp_path, dialect=dialect, max_shard_size=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(tensor_names(tmp_path))
    total = sum(t.numel() * t.element_size() for f in shards for t in load_file(tmp_path / f).values())
    assert index["metadata"]["total_size"] == total
    for f in shards:
        tensors = load_file(tmp_path / f)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1
    assert_same_model(model, MiniMaxForCausalLM.from_pretrained(tmp_path))


def test_resaving_removes_stale_shards(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(os.listdir(tmp_path)) > 3
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert_same_model(model, MiniMaxForCausalLM.from_pretrained(tmp_path))


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("2 parsecs")


# ---------------------------------------------------------------------- conversion
def test_convert_legacy_to_hf_and_back(tmp_path, model):
    src, mid, back = tmp_path / "legacy", tmp_path / "hf", tmp_path / "back"
    model.save_pretrained(src, dialect="legacy", max_shard_size="120KB")
    ByteTokenizer().save(src)
    convert_checkpoint(src, mid, "hf", max_shard_size="150KB")
    assert CheckpointReader(mid).dialect == "hf"
    assert json.loads((mid / "config.json").read_text())["model_type"] == "minimax"
    assert (mid / "tokenizer_config.json").is_file()
    assert isinstance(load_tokenizer(mid), ByteTokenizer)
    assert_same_model(model, MiniMaxForCausalLM.from_pretrained(mid))
    convert_checkpoint(mid, back, "legacy")
    original = {n: t for f in os.listdir(src) if f.endswith(".safetensors")
                for n, t in load_file(src / f).items()}
    again = load_file(back / "model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_convert_casts_and_refuses_to_clobber(tmp_path, model):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.save_pretrained(src, dialect="hf")
    convert_checkpoint(src, dst, "legacy", dtype="bfloat16")
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = MiniMaxForCausalLM.from_pretrained(dst)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    before = snapshot(dst)
    with pytest.raises(ValueError, match="not empty"):
        convert_checkpoint(src, dst, "hf")
    with pytest.raises(ValueError, match="is the source"):
        convert_checkpoint(src, src, "hf", overwrite=True)
    assert snapshot(dst) == before
    convert_checkpoint(src, dst, "hf", overwrite=True)
    assert CheckpointReader(dst).dialect == "hf"


def test_dialect_comes_from_tensor_names_not_config(tmp_path, model):
    """transformers 5 writes legacy tensor names under an hf config.json; the reverse also loads."""
    model.save_pretrained(tmp_path, dialect="legacy")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_config("hf")))
    assert CheckpointReader(tmp_path).dialect == "legacy"
    assert_same_model(model, MiniMaxForCausalLM.from_pretrained(tmp_path))


# ---------------------------------------------------------------------- dtype, device, meta
def test_dtype_and_device_options(tmp_path, model):
    model.save_pretrained(tmp_path)
    bf16 = MiniMaxForCausalLM.from_pretrained(tmp_path, dtype="bf16", device="cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.config.dtype == "bfloat16"
    assert all(layer.self_attn.slope.dtype == torch.float32 for layer in bf16.model.layers
               if layer.layer_type == "linear_attention")
    assert torch.equal(bf16.model.norm.weight, model.model.norm.weight.bfloat16())
    same = MiniMaxForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device=torch.device("cpu"))
    assert next(same.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="int8"):
        MiniMaxForCausalLM.from_pretrained(tmp_path, dtype="int8")


def test_default_dtype_is_the_saved_dtype(tmp_path):
    m = make_model().to(torch.bfloat16)
    m.save_pretrained(tmp_path)  # the debug preset says float32; the weights are bf16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = MiniMaxForCausalLM.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_loading_builds_on_meta_without_init(tmp_path, model, monkeypatch):
    """from_pretrained never runs the random init: the model is built on the meta device."""
    model.save_pretrained(tmp_path)
    import minimax01.model.init as init

    def boom(*a, **k):
        raise AssertionError("init_weights ran during from_pretrained")

    monkeypatch.setattr(init, "init_weights", boom)
    assert_same_model(model, MiniMaxForCausalLM.from_pretrained(tmp_path))


def test_text01_builds_on_meta():
    cfg = ModelConfig.from_preset("minimax-text-01")
    big = MiniMaxForCausalLM.from_config_on_meta(cfg)
    params = list(big.parameters())
    assert all(p.is_meta for p in params)
    assert round(sum(p.numel() for p in params) / 1e9, 2) == 456.09
    assert sum(p.numel() for p in params) == cfg.num_parameters()


def test_tied_embeddings(tmp_path, tokens):
    m = make_model(tie_word_embeddings=True)
    m.save_pretrained(tmp_path, dialect="hf")
    assert "lm_head.weight" not in tensor_names(tmp_path)
    loaded = MiniMaxForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, m(tokens).logits)
    # a tied checkpoint may also store the head, but only as a copy of the embedding
    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    MiniMaxForCausalLM.from_pretrained(tmp_path)
    sd["lm_head.weight"] += 1
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        MiniMaxForCausalLM.from_pretrained(tmp_path)


def test_save_then_tokenizer(tmp_path, model):
    from minimax01.checkpoint import save_pretrained

    save_pretrained(model, tmp_path, tokenizer=ByteTokenizer())
    assert (tmp_path / "tokenizer_config.json").is_file()


# ---------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path, model):
    model.save_pretrained(tmp_path, dialect="legacy")
    return tmp_path


def edit_weights(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def test_every_problem_in_one_error_and_nothing_read(saved, monkeypatch):
    def damage(sd):
        del sd["model.layers.1.self_attn.q_proj.weight"]
        del sd["model.layers.2.block_sparse_moe.experts.3.w2.weight"]
        sd["model.layers.0.self_attn.bogus.weight"] = torch.zeros(2)
        sd["model.norm.weight"] = torch.ones(63)

    edit_weights(saved, damage)
    reads = []
    original = CheckpointReader.read
    monkeypatch.setattr(CheckpointReader, "read", lambda self, *a: reads.append(a) or original(self, *a))
    before = snapshot(saved)
    with pytest.raises(CheckpointError) as info:
        MiniMaxForCausalLM.from_pretrained(saved)
    e = info.value
    assert isinstance(e, ValueError)
    msg = str(e)
    assert "\n" not in msg
    for name in ("model.layers.1.self_attn.q_proj.weight",
                 "model.layers.2.block_sparse_moe.experts.3.w2.weight",
                 "model.layers.0.self_attn.bogus.weight", "model.norm.weight (shape [63], expected [64])"):
        assert name in msg
    assert sorted(e.missing) == ["model.layers.1.self_attn.q_proj.weight",
                                 "model.layers.2.block_sparse_moe.experts.3.w2.weight"]
    assert e.unexpected == ["model.layers.0.self_attn.bogus.weight"]
    assert e.mismatched == ["model.norm.weight"]
    assert reads == []  # refused before reading any tensor data
    assert snapshot(saved) == before


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape", "dtype"])
def test_single_problem_named(saved, kind):
    name = "model.layers.0.self_attn.out_proj.weight"

    def damage(sd):
        if kind == "missing":
            del sd[name]
        elif kind == "unexpected":
            sd["model.layers.9.input_layernorm.weight"] = torch.zeros(64)
        elif kind == "shape":
            sd[name] = sd[name].t().contiguous()[:5]
        else:
            sd[name] = torch.zeros(sd[name].shape, dtype=torch.int32)

    edit_weights(saved, damage)
    with pytest.raises(CheckpointError) as info:
        MiniMaxForCausalLM.from_pretrained(saved)
    msg = str(info.value)
    if kind == "unexpected":
        assert "1 unexpected tensor(s): model.layers.9.input_layernorm.weight" in msg
    else:
        assert name in msg and ({"missing": "1 missing tensor(s)", "shape": "shape [5, 64]",
                                 "dtype": "dtype I32"}[kind] in msg)


def test_mixed_dialects_are_refused(saved):
    edit_weights(saved, lambda sd: sd.update({"model.layers.1.mlp.gate.weight": torch.zeros(4, 64)}))
    with pytest.raises(CheckpointError, match="mixes the legacy"):
        MiniMaxForCausalLM.from_pretrained(saved)


def test_derived_decay_buffers_are_ignored(saved, model):
    edit_weights(saved, lambda sd: sd.update({
        "model.layers.0.self_attn.slope_rate": torch.full((4, 1, 1), 9.0),
        "model.layers.0.self_attn.diagonal_decay": torch.zeros(1, 4, 16, 16)}))
    loaded = MiniMaxForCausalLM.from_pretrained(saved)
    assert torch.equal(loaded.model.layers[0].self_attn.slope, model.model.layers[0].self_attn.slope)


def test_index_problems(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index_path = tmp_path / "model.safetensors.index.json"
    good = index_path.read_text()
    index_path.write_text(good[:-20])
    with pytest.raises(CheckpointError, match="index.json: cannot read the shard index"):
        MiniMaxForCausalLM.from_pretrained(tmp_path)
    index = json.loads(good)
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00099-of-00099.safetensors"):
        MiniMaxForCausalLM.from_pretrained(tmp_path)
    index = json.loads(good)
    index["weight_map"]["model.norm.weight"] = "model-00001-of-" + good.split("-of-")[1][:5] + ".safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.norm.weight") as info:
        MiniMaxForCausalLM.from_pretrained(tmp_path)
    assert "not in their shard" in str(info.value) and "not listed" in str(info.value)
    index_path.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        MiniMaxForCausalLM.from_pretrained(tmp_path)
    index_path.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        MiniMaxForCausalLM.from_pretrained(tmp_path)


def test_corrupt_shard_is_named(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        MiniMaxForCausalLM.from_pretrained(saved)


def test_missing_config_or_weights_or_folder(tmp_path, saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        MiniMaxForCausalLM.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        MiniMaxForCausalLM.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(ModelConfig.from_preset("debug").to_hf_config()))
    with pytest.raises(CheckpointError, match="has no weights"):
        MiniMaxForCausalLM.from_pretrained(empty)
    (empty / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never unpickles"):
        MiniMaxForCausalLM.from_pretrained(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read"):
        MiniMaxForCausalLM.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "minimax", "num_attention_heads": 6, "hidden_size": 64,
                                                   "num_key_value_heads": 4}))
    with pytest.raises(CheckpointError, match="missing field 'vocab_size'"):
        MiniMaxForCausalLM.from_pretrained(empty)
    bad_heads = {**ModelConfig.from_preset("debug").to_hf_config(), "num_attention_heads": 6,
                 "num_key_value_heads": 4}
    (empty / "config.json").write_text(json.dumps(bad_heads))
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        MiniMaxForCausalLM.from_pretrained(empty)


def test_config_for_another_model_is_reported(saved):
    config = json.loads((saved / "config.json").read_text())
    config["num_local_experts"] = 5
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        MiniMaxForCausalLM.from_pretrained(saved)
    e = info.value
    assert len(e.missing) == 4 * 3 + 0 and not e.unexpected  # expert 4 (w1, w3, w2) in 4 layers
    assert len(e.mismatched) == 4  # the routers: [5, 64] expected, [4, 64] stored
    assert "model.layers.0.block_sparse_moe.gate.weight (shape [4, 64], expected [5, 64])" in str(e)


def test_failed_save_writes_nothing(tmp_path):
    m = make_model(postnorm=False)
    with pytest.raises(ValueError, match="postnorm"):
        m.save_pretrained(tmp_path / "out", dialect="hf")
    assert not (tmp_path / "out").exists()


def test_failed_save_over_a_checkpoint_leaves_it_intact(tmp_path, model, monkeypatch):
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    before = snapshot(tmp_path)
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def fail_third(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("disk full")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_third)
    other = make_model(seed=1)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(tmp_path, max_shard_size="100KB")
    assert snapshot(tmp_path) == before  # no temporary files, no new shard renamed into place
    assert_same_model(model, MiniMaxForCausalLM.from_pretrained(tmp_path))
