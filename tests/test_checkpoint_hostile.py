"""A checkpoint folder is input from anywhere: every bad config.json value is refused with its
field named, an index cannot point outside the folder, a config without a dtype loads the dtype
the weights hold, and a config claiming a huge model is refused before anything is built."""

from __future__ import annotations

import json
import time

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.checkpoint import CheckpointError
from minimax01.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug"))
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path / "hf", dialect="hf")
    model.save_pretrained(path / "sharded", max_shard_size="100KB")
    model.to(torch.bfloat16).save_pretrained(path / "legacy", dialect="legacy")
    return path


def with_config(saved, tmp_path, change, dialect="legacy"):
    """A copy of the saved checkpoint with config.json edited by `change(dict)`."""
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(saved / dialect, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config)
    (dst / "config.json").write_text(json.dumps(config))  # NaN / Infinity as Python writes them
    return dst


def set_(key, value):
    return lambda c: c.__setitem__(key, value)


@pytest.mark.parametrize("dialect, change, message", [
    ("legacy", set_("rope_theta", float("nan")), "rope_theta must be finite"),
    ("legacy", set_("rope_theta", float("inf")), "rope_theta must be finite"),
    ("legacy", set_("layernorm_mlp_alpha", float("inf")), "layernorm_mlp_alpha must be finite"),
    ("hf", set_("mlp_alpha_factor", float("nan")), "mlp_alpha_factor must be finite"),
    ("hf", lambda c: c["rope_parameters"].__setitem__("rope_theta", float("-inf")),
     "rope_parameters.rope_theta must be finite"),
    ("hf", set_("rope_parameters", "10000"), "rope_parameters must be an object"),
    ("legacy", set_("block_size", 1.5), "block_size must be an integer (got 1.5)"),
    ("legacy", set_("num_local_experts", "4"), "num_local_experts must be an integer"),
    ("legacy", set_("hidden_size", True), "hidden_size must be an integer"),
    ("legacy", set_("torch_dtype", "int8"), "torch_dtype must be one of float32, bfloat16"),
    ("hf", set_("dtype", "float64"), "dtype must be one of float32, bfloat16"),
    ("legacy", set_("postnorm", "false"), "postnorm must be true or false (got 'false')"),
    ("legacy", set_("tie_word_embeddings", "false"), "tie_word_embeddings must be true or false"),
    ("legacy", set_("attn_type_list", [0, True, 0, 1]), "attn_type_list[1] holds True"),
    ("legacy", set_("rms_norm_eps", -1e-5), "rms_norm_eps: must be positive"),
    ("legacy", set_("initializer_range", float("nan")), "initializer_range must be finite"),
    ("legacy", set_("minimax01", {"capacity_factor": "big"}), "minimax01.capacity_factor must be"),
    ("legacy", set_("minimax01", {"evil": 1}), "minimax01.evil: unknown field"),
    ("legacy", set_("bos_token_id", 10**6), "bos_token_id: must be a token id below"),
    ("legacy", lambda c: c.pop("vocab_size"), "missing field 'vocab_size'"),
])
def test_bad_config_values_are_refused_by_name(saved, tmp_path, dialect, change, message):
    path = with_config(saved, tmp_path, change, dialect)
    with pytest.raises(CheckpointError) as err:
        MiniMaxForCausalLM.from_pretrained(path)
    assert message in str(err.value) and "config.json" in str(err.value)


@pytest.mark.parametrize("layers", [5000, 10**9])
def test_a_huge_layer_count_is_refused_before_building(saved, tmp_path, capsys, layers):
    path = with_config(saved, tmp_path, lambda c: c.update(
        num_hidden_layers=layers, attn_type_list=[0] * min(layers, 5000)))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"num_hidden_layers: must be an integer in \[1, 1024\]"):
        MiniMaxForCausalLM.from_pretrained(path)
    rc = main(["info", "--checkpoint", str(path)])
    assert rc == 2 and "num_hidden_layers" in capsys.readouterr().err
    assert time.perf_counter() - start < 5


def test_too_many_experts_is_refused():
    with pytest.raises(ValueError, match="num_local_experts"):
        ModelConfig.from_preset("debug", num_local_experts=100_000)
    with pytest.raises(ValueError, match="times num_hidden_layers"):
        ModelConfig.from_preset("debug", num_local_experts=4096, num_hidden_layers=64,
                                layer_types=None)
    with pytest.raises(ValueError, match="sanity bound"):
        ModelConfig.from_preset("debug", hidden_size=1 << 24, intermediate_size=1 << 24)


def test_integral_floats_are_integers(saved, tmp_path):
    path = with_config(saved, tmp_path, set_("block_size", 16.0))
    assert MiniMaxForCausalLM.from_pretrained(path).config.block_size == 16


@pytest.mark.parametrize("dialect, stored", [("legacy", torch.bfloat16), ("hf", torch.float32)])
def test_a_config_without_dtype_loads_the_stored_dtype(saved, tmp_path, dialect, stored):
    path = with_config(saved, tmp_path, lambda c: (c.pop("torch_dtype", None), c.pop("dtype", None)),
                       dialect)
    model = MiniMaxForCausalLM.from_pretrained(path)
    assert model.model.embed_tokens.weight.dtype == stored
    assert model.config.dtype == str(stored).replace("torch.", "")


@pytest.mark.parametrize("name", ["../model-00001-of-00002.safetensors", "/etc/passwd",
                                  "sub/model.safetensors", "..", "C:\\x.safetensors"])
def test_index_entries_must_stay_inside_the_folder(saved, tmp_path, name):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(saved / "sharded", path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        MiniMaxForCausalLM.from_pretrained(path)
