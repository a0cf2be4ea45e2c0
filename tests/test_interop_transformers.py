"""Interop with transformers' MiniMaxForCausalLM (both directions, same logits) where its port is
faithful (SPEC §9: fp32, power-of-two heads, full rotary, no padding, post-norm), and the official
behaviours it lacks (partial rotary, general slopes, fp32 lightning state) against our own
float64 references."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.config import FULL, LINEAR
from minimax01.model.cache import HybridCache
from minimax01.model.layers import AttnContext, SoftmaxAttention
from minimax01.ops.rope import rope_cos_sin

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers")
    if not hasattr(tf, "MiniMaxForCausalLM"):
        pytest.skip("this transformers has no MiniMax model")
    tf.logging.set_verbosity_error()
    return tf


def faithful_config(**overrides):
    """Where transformers computes what the official model computes."""
    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rotary_dim=16,
                  layer_types=[LINEAR, FULL, LINEAR, FULL], num_local_experts=4,
                  num_experts_per_tok=2, block_size=8, rope_theta=10_000.0, dtype="float32")
    fields.update(overrides)
    return ModelConfig(**fields)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(faithful_config()).eval()


@pytest.fixture(scope="module")
def tokens():
    # 37 tokens: several lightning blocks of 8 and a ragged last one
    return torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits_of(model, tokens):
    return model(tokens).logits.float()


@pytest.mark.parametrize("dialect", ["hf", "legacy"])
def test_transformers_loads_our_weights(tmp_path, transformers, ours, tokens, dialect):
    """Our hf dialect loads as it is. transformers 5 also renames legacy (block_sparse_moe) tensors
    itself, but only under an hf config.json: its MiniMaxConfig does not read the legacy config.
    Sharded: transformers reads our index."""
    ours.save_pretrained(tmp_path, dialect=dialect, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    if dialect == "legacy":
        (tmp_path / "config.json").write_text(json.dumps(ours.config.to_hf_config("hf")))
    theirs = transformers.MiniMaxForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert rel_err(logits_of(theirs, tokens), logits_of(ours, tokens)) < REL_TOL


def test_transformers_misreads_the_legacy_config(tmp_path, transformers, ours):
    """A legacy config.json (MiniMaxText01) is not understood by transformers' MiniMaxConfig: it
    falls back to its defaults (alternating layers, residual factors 1). Use dialect="hf" or
    `convert` for transformers."""
    ours.save_pretrained(tmp_path, dialect="legacy")
    config = transformers.MiniMaxConfig.from_pretrained(tmp_path)
    assert config.mlp_alpha_factor == 1 != ours.config.mlp_alpha
    assert config.layer_types != ours.config.layer_types


def test_we_load_transformers_weights(tmp_path, transformers, tokens):
    """transformers 5 writes legacy tensor names, its decay buffers and an hf config.json."""
    tf_config = transformers.MiniMaxConfig(
        vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, block_size=8,
        layer_types=[LINEAR, LINEAR, FULL, LINEAR], num_local_experts=4, num_experts_per_tok=2,
        full_attn_alpha_factor=1.7, linear_attn_alpha_factor=1.6, mlp_alpha_factor=1.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, tie_word_embeddings=False)
    torch.manual_seed(1)
    theirs = transformers.MiniMaxForCausalLM(tf_config).eval()
    theirs.save_pretrained(tmp_path)
    ours = MiniMaxForCausalLM.from_pretrained(tmp_path)
    assert ours.config.layer_types == [LINEAR, LINEAR, FULL, LINEAR]
    assert (ours.config.full_attn_alpha, ours.config.mlp_alpha) == (1.7, 1.5)
    assert rel_err(logits_of(ours, tokens), logits_of(theirs, tokens)) < REL_TOL


# ---------------------------------------------------------------------- official behaviours
@torch.no_grad()
def reference_softmax_attention(x, attn, theta, rotary_dim):
    """SPEC §4 in float64, written out: partial NeoX RoPE on the first rotary_dim dims, GQA, causal
    softmax with scale 1/sqrt(d)."""
    x = x.double()
    b, t, _ = x.shape
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.double().T).view(b, t, h, d)
    k = (x @ attn.k_proj.weight.double().T).view(b, t, hkv, d)
    v = (x @ attn.v_proj.weight.double().T).view(b, t, hkv, d)

    def rope(z):
        out = z.clone()
        half = rotary_dim // 2
        for i in range(half):
            inv_freq = theta ** (-2 * i / rotary_dim)
            for p in range(t):
                c, s = math.cos(p * inv_freq), math.sin(p * inv_freq)
                a, bb = z[:, p, :, i], z[:, p, :, i + half]
                out[:, p, :, i] = a * c - bb * s
                out[:, p, :, i + half] = bb * c + a * s
        return out

    q, k = rope(q), rope(k)
    group = h // hkv
    out = torch.empty(b, t, h, d, dtype=torch.float64)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for head in range(h):
        kv = head // group
        scores = q[:, :, head] @ k[:, :, kv].transpose(1, 2) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out[:, :, head] = probs @ v[:, :, kv]
    return out.reshape(b, t, h * d) @ attn.o_proj.weight.double().T


def test_partial_rotary_against_float64_reference():
    cfg = faithful_config(rotary_dim=6, num_attention_heads=6, num_key_value_heads=2,
                          rope_theta=10_000.0)
    torch.manual_seed(0)
    attn = SoftmaxAttention(cfg, 1).double()
    for w in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight):
        torch.nn.init.normal_(w, std=0.3)
    x = torch.randn(2, 11, cfg.hidden_size, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(11), cfg.rotary_dim, cfg.rope_theta)
    ours = attn(x, AttnContext(cos=cos, sin=sin))
    ref = reference_softmax_attention(x, attn, cfg.rope_theta, cfg.rotary_dim)
    assert rel_err(ours, ref) < 1e-5  # RoPE angles are fp32 by the SPEC
    # the pass-through dims matter: full rotary gives a different answer
    full = reference_softmax_attention(x, attn, cfg.rope_theta, cfg.head_dim)
    assert rel_err(full, ref) > 1e-2


def test_non_power_of_two_head_slopes(tmp_path):
    """SPEC §8: H = 6 takes the 4-ladder, then every other entry of the 8-ladder."""
    base = torch.tensor([0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125], dtype=torch.float64)
    cfg = faithful_config(num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=5,
                          layer_types=[LINEAR, LINEAR, FULL, LINEAR, LINEAR])
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    loaded = MiniMaxForCausalLM.from_pretrained(tmp_path)
    for m in (model, loaded):
        for layer_idx, layer in enumerate(m.model.layers):
            if layer.layer_type != LINEAR:
                continue
            expected = (base * (1 - layer_idx / 4 + 1e-5)).float()
            assert layer.self_attn.slope.dtype == torch.float32
            assert torch.equal(layer.self_attn.slope, expected)


@torch.no_grad()
def test_lightning_state_stays_fp32_under_bf16():
    """The cache's lightning state is fp32 and accumulates in fp32 even for a bf16 model: it matches
    a float64 recurrence over the very same bf16 q, k, v far better than bf16 precision."""
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(faithful_config()).to(torch.bfloat16).eval()
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(5))
    cache = HybridCache(model.config, 2, 40, dtype=torch.bfloat16)
    captured = {}
    attn = model.model.layers[0].self_attn

    def keep_input(module, args):
        captured.setdefault("x", args[0])

    hook = attn.register_forward_pre_hook(keep_input)
    model(tokens, cache=cache)
    hook.remove()
    model(tokens[:, :1], cache=cache)  # one decode step on top
    state = cache.states[0]
    assert state.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in cache.states.values())
    assert cache.keys[1].dtype == torch.bfloat16

    x = captured["x"]
    b, t, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = F.silu(attn.qkv_proj(x)).view(b, t, h, 3 * d)
    _, k, v = qkv.split(d, dim=-1)
    lam = torch.exp(-attn.slope.double())[None, :, None, None]
    ref = torch.zeros(b, h, d, d, dtype=torch.float64)
    for s in range(t):
        ref = lam * ref + k[:, s].double()[..., :, None] * v[:, s].double()[..., None, :]
    # the decode step's k, v: the first layer's input is the normalised embedding
    x_last = model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens[:, :1]))
    qkv = F.silu(attn.qkv_proj(x_last)).view(b, 1, h, 3 * d)
    _, k1, v1 = qkv.split(d, dim=-1)
    ref = lam * ref + k1[:, 0].double()[..., :, None] * v1[:, 0].double()[..., None, :]
    err = rel_err(state.double(), ref)
    assert err < 1e-5, err
    bf16_round_off = rel_err(ref.to(torch.bfloat16).double(), ref)
    assert err < bf16_round_off / 10
