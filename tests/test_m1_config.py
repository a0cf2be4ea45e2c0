"""MiniMax-M1 checkpoints (SPEC §10): `model_type` minimax_m1, `MiniMaxM1ForCausalLM`,
`shared_intermediate_size` as an int. Same architecture and tensor names as Text-01."""

import json

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.config import hybrid_layer_types

ALPHA = (2 * 80) ** 0.25


def m1_config(**kw) -> dict:
    """MiniMax-M1's config.json, field for field."""
    cfg = {
        "architectures": ["MiniMaxM1ForCausalLM"], "model_type": "minimax_m1",
        "attention_dropout": 0.0, "attn_type_list": [int(i % 8 == 7) for i in range(80)],
        "bos_token_id": None, "eos_token_id": None, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 6144, "initializer_range": 0.02, "intermediate_size": 9216,
        "layernorm_full_attention_alpha": ALPHA, "layernorm_full_attention_beta": 1.0,
        "layernorm_linear_attention_alpha": ALPHA, "layernorm_linear_attention_beta": 1.0,
        "layernorm_mlp_alpha": ALPHA, "layernorm_mlp_beta": 1.0,
        "max_position_embeddings": 10240000, "num_attention_heads": 64, "num_experts_per_tok": 2,
        "num_hidden_layers": 80, "num_key_value_heads": 8, "num_local_experts": 32,
        "output_router_logits": False, "postnorm": True, "rms_norm_eps": 1e-05,
        "rope_theta": 10000000, "rotary_dim": 64, "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0, "shared_intermediate_size": 0, "shared_moe_mode": "sigmoid",
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.2", "use_cache": True, "vocab_size": 200064,
    }
    cfg.update(kw)
    return cfg


def test_m1_config_is_text01():
    cfg = ModelConfig.from_hf_config(m1_config())
    assert cfg == ModelConfig.from_preset("minimax-text-01")
    assert round(cfg.num_parameters() / 1e9, 2) == 456.09


@pytest.mark.parametrize("shared", [0, [0], [0] * 80])
def test_shared_intermediate_size_zero_in_any_form(shared):
    cfg = ModelConfig.from_hf_config(m1_config(shared_intermediate_size=shared))
    assert cfg.intermediate_size == 9216


@pytest.mark.parametrize("shared, match", [(1024, "shared experts"), ([0, 512], "shared experts"),
                                           ("0", "integer or a list"), (True, "integer or a list")])
def test_shared_experts_refused(shared, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(m1_config(shared_intermediate_size=shared))


def test_m1_checkpoint_loads(tmp_path):
    """A small model saved with an M1 config.json loads and computes the same logits."""
    torch.manual_seed(0)
    small = ModelConfig.from_preset("debug", layer_types=hybrid_layer_types(4, 4))
    model = MiniMaxForCausalLM(small).eval()
    model.save_pretrained(tmp_path, dialect="legacy")
    written = json.loads((tmp_path / "config.json").read_text())
    written.update(model_type="minimax_m1", architectures=["MiniMaxM1ForCausalLM"],
                   shared_intermediate_size=0, shared_moe_mode="sigmoid")
    (tmp_path / "config.json").write_text(json.dumps(written))
    back = MiniMaxForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
