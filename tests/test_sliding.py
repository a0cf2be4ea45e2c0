"""Sliding-window softmax layers (`sliding_attention`, ours): every path (blocked op, packed,
padded, HybridCache prefill/decode with its ring buffer, generate) against a plain masked
reference; the config's validation and both HF dialects; transformers' own sliding window."""

import math

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig, generate
from minimax01.config import FULL, LINEAR, SLIDING
from minimax01.hf_config import preferred_dialect
from minimax01.model import layers as layers_mod
from minimax01.model.cache import HybridCache
from minimax01.ops.attention import cached_attention, causal_attention, windowed_attention

WINDOW = 5


def reference_attention(q, k, v, window, q_pos, k_pos, k_ok, scale):
    """float64 softmax attention with an explicit mask: key j visible to query i iff
    k_ok[b, i, j] and 0 <= q_pos - k_pos < window. q: [B, Tq, H, D]; k, v: [B, S, Hkv, D]."""
    rep = q.shape[2] // k.shape[2]
    k = k.double().repeat_interleave(rep, 2)
    v = v.double().repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * scale
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    mask = k_ok & (dist >= 0) & (dist < window)
    scores = scores.masked_fill(~mask[:, None], -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def rand_qkv(b, t, h=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, h, d, generator=g), torch.randn(b, t, hkv, d, generator=g),
            torch.randn(b, t, hkv, d, generator=g))


@pytest.mark.parametrize("window,block", [(1, None), (3, 4), (8, 5), (40, None), (7, 64)])
def test_windowed_op_matches_masked_reference(window, block):
    q, k, v = rand_qkv(2, 37)
    got = windowed_attention(q, k, v, window, scale=0.3, block_size=block)
    pos = torch.arange(37)[None].expand(2, -1)
    ok = torch.ones(2, 37, 37, dtype=torch.bool)
    ref = reference_attention(q, k, v, window, pos, pos, ok, 0.3)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_windowed_op_packed_documents():
    lens = [9, 1, 20, 7]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = rand_qkv(1, sum(lens), seed=1)
    got = causal_attention(q, k, v, cu_seqlens=cu, scale=0.25, window=WINDOW)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    pos = torch.arange(sum(lens))[None]
    ok = (doc[:, None] == doc[None, :])[None]
    ref = reference_attention(q, k, v, WINDOW, pos, pos, ok, 0.25)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # the window hides nothing when every document is shorter: the plain causal path
    short = causal_attention(q, k, v, cu_seqlens=cu, scale=0.25, window=100)
    torch.testing.assert_close(short, causal_attention(q, k, v, cu_seqlens=cu, scale=0.25))


def test_cached_attention_window_counts_real_tokens_not_padding():
    q, k, v = rand_qkv(2, 12, seed=2)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    got = cached_attention(q, k.transpose(1, 2), v.transpose(1, 2), valid, scale=0.5, window=3)
    pos = valid.long().cumsum(-1) - 1
    ok = valid[:, None, :].expand(2, 12, 12).clone()
    ref = reference_attention(q, k, v, 3, pos, pos, ok, 0.5)
    real = valid[:, :, None, None].expand_as(got)
    torch.testing.assert_close(got.double()[real], ref[real], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- the model
def sliding_config(types=(LINEAR, SLIDING, LINEAR, FULL), window=WINDOW, **kw):
    base = dict(layer_types=list(types), sliding_window=window)
    base.update(kw)
    return ModelConfig.from_preset("debug", **base)


def sliding_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniMaxForCausalLM(sliding_config(**kw)).eval()


def reference_logits(model, ids):
    """Logits with every sliding layer's attention replaced by the float64 masked reference."""
    real = layers_mod.causal_attention

    def ref(q, k, v, *, cu_seqlens=None, scale=None, window=None):
        if window is None:
            return real(q, k, v, cu_seqlens=cu_seqlens, scale=scale)
        t = q.shape[1]
        pos = torch.arange(t)[None]
        ok = torch.ones(1, t, t, dtype=torch.bool)
        return reference_attention(q, k, v, window, pos, pos, ok, scale).to(q.dtype)

    layers_mod.causal_attention = ref
    try:
        return torch.cat([model(row[None]).logits for row in ids])
    finally:
        layers_mod.causal_attention = real


def test_model_forward_matches_reference_and_window_matters():
    model = sliding_model(1)
    x = torch.randint(0, 256, (2, 23))
    got = model(x).logits
    torch.testing.assert_close(got, reference_logits(model, x), rtol=1e-5, atol=1e-5)
    # a full-attention twin with the same weights differs once the sequence is longer than W
    twin = MiniMaxForCausalLM(ModelConfig.from_preset("debug", layer_types=[LINEAR, FULL] * 2)).eval()
    twin.load_state_dict(model.state_dict())
    full = twin(x).logits
    torch.testing.assert_close(got[:, :WINDOW], full[:, :WINDOW], rtol=1e-5, atol=1e-5)
    assert (got[:, WINDOW + 1:] - full[:, WINDOW + 1:]).abs().max() > 1e-3


def test_packed_equals_separate():
    model = sliding_model(2)
    lens = [11, 1, 17, 6]
    docs = [torch.randint(0, 256, (1, n)) for n in lens]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    out = model(torch.cat(docs, 1), cu_seqlens=cu).logits
    for (a, b), doc in zip(zip(cu[:-1].tolist(), cu[1:].tolist()), docs):
        torch.testing.assert_close(out[:, a:b], model(doc).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_changes_nothing_for_real_tokens(side):
    model = sliding_model(3)
    x = torch.randint(0, 256, (1, 14))
    ref = model(x).logits
    pad = torch.full((1, 6), 258)
    ones, zeros = torch.ones(1, 14, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)
    if side == "left":
        got = model(torch.cat([pad, x], 1), attention_mask=torch.cat([zeros, ones], 1)).logits[:, 6:]
    else:
        got = model(torch.cat([x, pad], 1), attention_mask=torch.cat([ones, zeros], 1)).logits[:, :14]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 2, WINDOW, 40])
def test_cached_prefill_and_decode_equal_full_forward(window):
    model = sliding_model(4, window=window)
    b, t = 3, 26
    x = torch.randint(0, 256, (b, t))
    pads = [0, 3, 8]
    mask = torch.ones(b, t, dtype=torch.long)
    for row, p in enumerate(pads):
        x[row, :p] = 258
        mask[row, :p] = 0
    full = model(x, attention_mask=mask).logits
    cache = HybridCache(model.config, b, t)
    got = [model(x[:, :4], attention_mask=mask[:, :4], cache=cache).logits,
           model(x[:, 4:13], attention_mask=mask[:, 4:13], cache=cache).logits]
    got += [model(x[:, i:i + 1], cache=cache).logits for i in range(13, t)]
    got = torch.cat(got, 1)
    for row, p in enumerate(pads):
        torch.testing.assert_close(got[row, p:], full[row, p:], rtol=1e-5, atol=1e-5)
    # the sliding layer's cache is window - 1 slots (at most the cache's length), whatever the
    # length of the context
    assert cache.ring_keys[1].shape[1] == min(window, t) - 1 and 1 not in cache.keys


def test_generate_equals_argmax_of_full_forward_and_batch_equals_single():
    model = sliding_model(5)
    x = torch.randint(0, 256, (1, 9))
    out = generate(model, x, max_new_tokens=8)
    seq = x
    for _ in range(8):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tolist() == seq.tolist()
    prompts = [[1, 2, 3], list(range(10, 22)), [99]]
    batched = generate(model, prompts, max_new_tokens=7)
    width = max(len(p) for p in prompts)
    for row, p in enumerate(prompts):
        assert batched[row, width:].tolist() == generate(model, [p], max_new_tokens=7)[0, len(p):].tolist()


def test_caches_and_parallel_code_without_windows_are_refused():
    model = sliding_model(6)
    x = torch.randint(0, 256, (1, 8))
    cache = HybridCache(model.config, 1, 16)
    model(x[:, :4], cache=cache)
    with pytest.raises(ValueError, match="left-padded"):  # a pad after a sequence's first token
        model(x[:, 4:6], attention_mask=torch.tensor([[1, 0]]), cache=cache)

    class NoWindowCache(HybridCache):
        supports_sliding_window = False

    with pytest.raises(ValueError, match="NoWindowCache does not support sliding_attention"):
        model(x, cache=NoWindowCache(model.config, 1, 16))
    # the serving engine's slot cache (infer/) has no windows yet: refused, naming the layer,
    # when its pool is made and by the engine before it prepares the model
    from minimax01.infer.engine import Engine
    from minimax01.infer.slot_cache import SlotPool

    refused = r"SlotCache does not support sliding_attention layers \(layer 1\)"
    with pytest.raises(ValueError, match=refused):
        SlotPool(model.config, 1, 32)
    with pytest.raises(ValueError, match=refused):
        Engine(model, max_context=32, num_slots=1)
    # context parallelism: parallelize refuses before plugging anything in, and a windowed
    # layer refuses any attn_fn (none knows windows)
    from minimax01.parallel.context import CPGroup
    from minimax01.parallel.parallelize import apply_context_parallel
    from minimax01.parallel.world import ParallelConfig

    with pytest.raises(ValueError, match=r"sliding_attention layer 1: context parallelism"):
        apply_context_parallel(model, CPGroup(None, 0, 2), ParallelConfig())
    assert all(layer.self_attn.attn_fn is None for layer in model.model.layers)
    model.model.layers[1].self_attn.attn_fn = causal_attention  # what ring attention plugs in
    with pytest.raises(ValueError, match="context parallelism"):
        model(x)


def test_accounting():
    cfg = sliding_config(window=64)
    full = ModelConfig.from_preset("debug")
    assert cfg.num_parameters() == full.num_parameters()  # the same weights
    assert cfg.num_sliding_layers == 1 and cfg.num_full_layers == 1
    h, d = cfg.num_attention_heads, cfg.head_dim
    # at T <= W nothing changes; at T = 4W the sliding layer averages W - W^2/(2T) keys
    assert cfg.flops_per_token(64) == full.flops_per_token(64)
    expect = full.flops_per_token(256) - 2 * 2 * h * d * (128 - (64 - 64 * 64 / 512))
    assert cfg.flops_per_token(256) == pytest.approx(expect)
    assert cfg.sliding_cache_bytes(2) == 1 * 2 * cfg.kv_width * 64 * 2
    assert cfg.kv_cache_bytes_per_token(2) == full.kv_cache_bytes_per_token(2) // 2


# ---------------------------------------------------------------------- config and dialects
@pytest.mark.parametrize("changes,match", [
    (dict(layer_types=[LINEAR, SLIDING] * 2), "sliding_window: must be set"),
    (dict(sliding_window=8), "no layer is sliding_attention"),
    (dict(layer_types=[LINEAR, SLIDING] * 2, sliding_window=0), "positive integer"),
    (dict(layer_types=[LINEAR, "sliding"] * 2, sliding_window=4), "unknown layer type"),
])
def test_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_preset("debug", **changes)


def test_changing_the_layer_count_drops_the_window_with_the_pattern():
    cfg = sliding_config()
    assert SLIDING not in cfg.replace(num_hidden_layers=8).layer_types
    assert cfg.replace(num_hidden_layers=8).sliding_window is None


@pytest.mark.parametrize("types", [(LINEAR, SLIDING) * 2, (LINEAR, SLIDING, LINEAR, FULL)])
def test_hf_dialect_round_trip_and_legacy_refusal(types, tmp_path):
    cfg = sliding_config(types)
    hf = cfg.to_hf_config("hf")
    assert ModelConfig.from_hf_config(hf) == cfg
    if FULL in types:  # transformers cannot express the mix: our own entry and block
        assert hf["layer_types"][1] == SLIDING and hf["sliding_window"] is None
        assert hf["minimax01"]["sliding_window"] == WINDOW
    else:  # exactly transformers' sliding_window over every softmax layer
        assert SLIDING not in hf["layer_types"] and hf["sliding_window"] == WINDOW
    with pytest.raises(ValueError, match="'legacy' dialect.*sliding_attention"):
        cfg.to_hf_config("legacy")
    legacy = ModelConfig.from_preset("debug").to_hf_config("legacy")
    for bad in ({"sliding_window": 4}, {"minimax01": {"sliding_window": 4,
                                                      "layer_types": list(types)}}):
        with pytest.raises(ValueError, match="legacy MiniMaxText01 dialect"):
            ModelConfig.from_hf_config({**legacy, **bad})
    assert preferred_dialect(cfg) == "hf"
    assert preferred_dialect(ModelConfig.from_preset("debug")) == "legacy"
    # weights too: save in hf, load back, same logits
    model = MiniMaxForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path, dialect="hf")
    loaded = MiniMaxForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == cfg
    x = torch.randint(0, 256, (1, 19))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="legacy"):
        model.save_pretrained(tmp_path / "legacy", dialect="legacy")


def test_transformers_computes_the_same_sliding_window(tmp_path):
    tf = pytest.importorskip("transformers")
    if not hasattr(tf, "MiniMaxForCausalLM"):
        pytest.skip("this transformers has no MiniMax model")
    tf.logging.set_verbosity_error()
    # where transformers' port is faithful (SPEC §9): fp32, power-of-two heads, full rotary
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rotary_dim=16,
                      layer_types=[LINEAR, SLIDING] * 2, sliding_window=6, num_local_experts=4,
                      num_experts_per_tok=2, block_size=8, rope_theta=10_000.0, dtype="float32")
    torch.manual_seed(0)
    ours = MiniMaxForCausalLM(cfg).eval()
    ours.save_pretrained(tmp_path, dialect="hf")
    theirs = tf.MiniMaxForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert theirs.config.sliding_window == 6
    x = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits.float()
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4


# ---------------------------------------------------------------------- merged with issue 10 / 15
@pytest.mark.parametrize("changes,match", [
    (dict(sliding_window=True), "must be a positive integer"),
    (dict(sliding_window=4.0), "must be a positive integer"),
    (dict(sliding_window=100, max_position_embeddings=64),
     "must be at most max_position_embeddings=64"),
])
def test_window_is_typed_and_bounded(changes, match):
    with pytest.raises(ValueError, match=r"ModelConfig\.sliding_window: " + match):
        sliding_config(**changes)


def test_hf_reader_checks_the_window_types():
    """config.json is hostile input: the window's JSON type is checked, a disagreement named."""
    hf = sliding_config([LINEAR, SLIDING] * 2).to_hf_config("hf")
    for bad, match in (({"sliding_window": "5"}, r"config.json: sliding_window must be an integer"),
                       ({"sliding_window": 5.5}, "sliding_window must be an integer"),
                       ({"minimax01": {**hf["minimax01"], "sliding_window": 6}}, "disagree")):
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_hf_config({**hf, **bad})
    mixed = sliding_config().to_hf_config("hf")
    with pytest.raises(ValueError, match=r"minimax01.sliding_window must be an integer"):
        ModelConfig.from_hf_config({**mixed, "minimax01": {**mixed["minimax01"],
                                                           "sliding_window": [5]}})
    assert ModelConfig.from_hf_config({**hf, "sliding_window": 5.0}) == sliding_config(
        [LINEAR, SLIDING] * 2)  # an integral float is an integer


def test_cache_ring_never_exceeds_the_cache():
    cfg = sliding_config(window=1000)
    cache = HybridCache(cfg, 2, 16)
    assert cache.ring_keys[1].shape[1] == 15


def test_quantized_sliding_model_matches_its_16bit_twin():
    from minimax01.quant import QuantizedLinear, quantize_model

    model = sliding_model(7)
    x = torch.randint(0, 256, (1, 21))
    ref = model(x).logits
    q = MiniMaxForCausalLM(model.config).eval()
    q.load_state_dict(model.state_dict())
    quantize_model(q, "int8")
    assert isinstance(q.model.layers[1].self_attn.q_proj, QuantizedLinear)
    got = q(x).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.02


def test_hf_window_edge_cases():
    """A transformers config whose window covers no softmax layer reads as it computes (no
    window); one without layer_types cannot say which layers the window covers."""
    lin = ModelConfig.from_preset("debug", layer_types=[LINEAR] * 4)
    hf = lin.to_hf_config("hf")
    assert ModelConfig.from_hf_config({**hf, "sliding_window": 8}) == lin
    hf.pop("layer_types")
    with pytest.raises(ValueError, match="sliding_window needs layer_types"):
        ModelConfig.from_hf_config({**hf, "model_type": "minimax", "sliding_window": 8})
