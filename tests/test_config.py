"""ModelConfig: presets, parameter accounting (SPEC §1, §8), validation, and the two HF config
dialects (SPEC §6)."""

import json

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.config import FULL, LINEAR, MODEL_PRESETS, hybrid_layer_types

ALPHA_80 = 3.5565588200778455


def meta_count(cfg):
    return sum(p.numel() for p in MiniMaxForCausalLM.from_config_on_meta(cfg).parameters())


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_presets_build_and_count_their_parameters(name):
    cfg = ModelConfig.from_preset(name)
    cfg.validate()
    assert meta_count(cfg) == cfg.num_parameters()


def test_active_parameters_by_hand():
    cfg = ModelConfig.from_preset("debug")
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    unused = cfg.num_hidden_layers * (e - k) * 3 * h * i
    assert cfg.num_parameters(active=True) == cfg.num_parameters() - unused
    assert cfg.num_parameters(embeddings=False) == cfg.num_parameters() - 2 * cfg.vocab_size * h
    tied = cfg.replace(tie_word_embeddings=True)
    assert tied.num_parameters() == cfg.num_parameters() - cfg.vocab_size * h == meta_count(tied)


def test_text01_facts():
    cfg = ModelConfig.from_preset("minimax-text-01")
    assert round(cfg.num_parameters() / 1e9, 2) == 456.09
    assert round(cfg.num_parameters(active=True, embeddings=False) / 1e9, 2) == 45.94
    assert round(cfg.num_parameters(active=True) / 1e9, 2) == 48.40
    assert cfg.full_attn_alpha == cfg.linear_attn_alpha == cfg.mlp_alpha == ALPHA_80
    assert (cfg.full_attn_beta, cfg.linear_attn_beta, cfg.mlp_beta) == (1.0, 1.0, 1.0)
    assert [i for i, t in enumerate(cfg.layer_types) if t == FULL] == list(range(7, 80, 8))
    assert (cfg.num_linear_layers, cfg.num_full_layers) == (70, 10)
    assert cfg.kv_cache_bytes_per_token(2) == 40 * 1024
    assert cfg.lightning_state_bytes() == 70 * 4 * 2**20


@pytest.mark.parametrize("changes, field", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
    (dict(rotary_dim=7), "rotary_dim"),
    (dict(rotary_dim=32), "rotary_dim"),
    (dict(rotary_dim=-2), "rotary_dim"),
    (dict(layer_types=[LINEAR, "mamba", FULL, LINEAR]), r"layer_types\[1\]"),
    (dict(layer_types=[LINEAR, FULL]), "layer_types"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size=64.0), "hidden_size"),
    (dict(dtype="int8"), "dtype"),
    (dict(eos_token_id=512), "eos_token_id"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
])
def test_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_preset("debug", **changes)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*minimax-text-01"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="did you mean 'num_hidden_layers'"):
        ModelConfig.from_dict({"num_hidden_layer": 3})


def test_replace_rederives_alpha():
    cfg = ModelConfig.from_preset("debug")
    deeper = cfg.replace(num_hidden_layers=80)
    assert deeper.mlp_alpha == ALPHA_80 and len(deeper.layer_types) == 80
    assert cfg.replace(postnorm=False).mlp_alpha == 1.0
    assert cfg.replace(num_hidden_layers=8, mlp_alpha=2.0).mlp_alpha == 2.0


@pytest.mark.parametrize("dialect", ["legacy", "hf"])
@pytest.mark.parametrize("name", ["debug", "minimax-text-01"])
def test_hf_dialects_round_trip(tmp_path, dialect, name):
    cfg = ModelConfig.from_preset(name, capacity_factor=1.25)
    hf = cfg.to_hf_config(dialect)
    json.dumps(hf)  # plain JSON
    if dialect == "legacy":
        assert hf["model_type"] == "MiniMaxText01"
        assert hf["attn_type_list"] == [int(t == FULL) for t in cfg.layer_types]
        assert hf["layernorm_mlp_alpha"] == cfg.mlp_alpha and hf["rotary_dim"] == cfg.rotary_dim
    else:
        assert hf["model_type"] == "minimax" and hf["layer_types"] == cfg.layer_types
        assert hf["mlp_alpha_factor"] == cfg.mlp_alpha
        assert hf["rope_parameters"]["partial_rotary_factor"] == cfg.rotary_dim / cfg.head_dim
    assert ModelConfig.from_hf_config(hf) == cfg
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert ModelConfig.from_hf_config(tmp_path / "config.json") == cfg
    assert ModelConfig.from_hf_config(str(tmp_path)) == cfg


def test_official_text01_config_reads_as_the_preset():
    """The fields of the released config.json (legacy dialect, SPEC §6) give the preset."""
    official = {
        "architectures": ["MiniMaxText01ForCausalLM"], "model_type": "MiniMaxText01",
        "attn_type_list": [int(i % 8 == 7) for i in range(80)], "head_dim": 128,
        "hidden_size": 6144, "intermediate_size": 9216, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "num_local_experts": 32,
        "num_experts_per_tok": 2, "vocab_size": 200064, "rotary_dim": 64, "rope_theta": 10000000,
        "postnorm": True, "rms_norm_eps": 1e-05, "router_aux_loss_coef": 0.001,
        "max_position_embeddings": 10240000, "shared_intermediate_size": 0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
        **{f"layernorm_{k}_{ab}": (ALPHA_80 if ab == "alpha" else 1.0)
           for k in ("full_attention", "linear_attention", "mlp") for ab in ("alpha", "beta")},
    }
    assert ModelConfig.from_hf_config(official) == ModelConfig.from_preset("minimax-text-01")


def test_hf_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_hf_config(tmp_path)
    with pytest.raises(ValueError, match="model_type='llama'"):
        ModelConfig.from_hf_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="shared experts"):
        ModelConfig.from_hf_config({**ModelConfig().to_hf_config("legacy"), "shared_intermediate_size": 8})
    with pytest.raises(ValueError, match="postnorm"):
        ModelConfig.from_preset("debug", postnorm=False).to_hf_config("hf")
    with pytest.raises(ValueError, match="dialect"):
        ModelConfig().to_hf_config("gguf")


@pytest.mark.parametrize("kind", [FULL, LINEAR])
def test_single_kind_variants_are_one_field(kind):
    cfg = ModelConfig.from_preset("debug").replace(layer_types=[kind] * 4)
    model = MiniMaxForCausalLM(cfg).eval()
    assert [layer.layer_type for layer in model.model.layers] == [kind] * 4
    has_state = kind == LINEAR
    assert (cfg.lightning_state_bytes() > 0) == has_state
    assert (cfg.kv_cache_bytes_per_token() > 0) != has_state
    with torch.no_grad():
        logits = model(torch.randint(0, 512, (1, 20))).logits
    assert logits.shape == (1, 20, 512) and torch.isfinite(logits).all()
    assert ModelConfig.from_hf_config(cfg.to_hf_config("legacy")).layer_types == [kind] * 4


def test_hybrid_pattern():
    assert hybrid_layer_types(8) == [LINEAR] * 7 + [FULL]
    assert hybrid_layer_types(4, 2) == [LINEAR, FULL, LINEAR, FULL]
