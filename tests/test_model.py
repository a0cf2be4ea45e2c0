"""The model against SPEC §2-§5 written out by hand, and its invariances: packed == separate,
padded == unpadded, cached decoding == full forward, batch == one by one."""

import math

import pytest
import torch
import torch.nn.functional as F

from minimax01 import MiniMaxForCausalLM, ModelConfig, generate
from minimax01.config import FULL, LINEAR
from minimax01.model.cache import HybridCache
from minimax01.model.layers import AttnContext, DecoderLayer, LightningAttention, MoE
from minimax01.ops.lightning import lightning_slopes


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("debug", **overrides)
    return MiniMaxForCausalLM(cfg).eval()


def test_forward_shapes_and_loss():
    model = make_model()
    x = torch.randint(0, 256, (2, 21))
    out = model(x, labels=x)
    assert out.logits.shape == (2, 21, model.config.vocab_size)
    assert out.logits.dtype == torch.float32
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ref)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    # aux = coef * mean over layers of E * sum f P; between coef*k*(~1) for near-uniform routing
    k = model.config.num_experts_per_tok
    assert 0.5 * k < out.aux_loss.item() / model.config.router_aux_loss_coef < 2.0 * k
    assert model(x).loss is None


def test_every_parameter_gets_a_gradient():
    model = make_model().train()
    x = torch.randint(0, 256, (2, 33))
    model(x, labels=x).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def _lightning_reference(attn: LightningAttention, x: torch.Tensor, cfg: ModelConfig, layer_idx):
    """SPEC §3 step by step in float64 with the token recurrence."""
    x = x.double()
    h, d = cfg.num_attention_heads, cfg.head_dim
    w = attn.qkv_proj.weight.double()
    qkv = F.silu(x @ w.t())  # [B, T, 3*H*d]
    b, t, _ = x.shape
    qkv = qkv.view(b, t, h, 3 * d)  # per-head interleaved q | k | v
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    base = [2 ** (-8 / h * (i + 1)) for i in range(h)] if math.log2(h).is_integer() else None
    if base is not None:
        factor = 1 - layer_idx / (cfg.num_hidden_layers - 1) + 1e-5
        slopes = torch.tensor([s * factor for s in base], dtype=torch.float64)
        lam = torch.exp(-slopes.float().double())  # slopes are fp32 constants (SPEC §3)
    else:
        lam = torch.exp(-lightning_slopes(h, layer_idx, cfg.num_hidden_layers).double())
    state = torch.zeros(b, h, d, d, dtype=torch.float64)
    outs = []
    for i in range(t):
        state = lam[None, :, None, None] * state + k[:, i, :, :, None] * v[:, i, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, i], state))
    o = torch.stack(outs, 1).reshape(b, t, h * d)
    u = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.lightning_norm_eps)
    u = u * attn.norm.weight.double()
    gate = torch.sigmoid(x @ attn.output_gate.weight.double().t())
    return (gate * u) @ attn.out_proj.weight.double().t()


@pytest.mark.parametrize("heads", [4, 6])
def test_lightning_layer_matches_spec(heads):
    cfg = ModelConfig.from_preset("debug", num_attention_heads=heads, num_key_value_heads=2)
    torch.manual_seed(1)
    layer_idx = 2
    attn = LightningAttention(cfg, layer_idx).double()
    with torch.no_grad():
        attn.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 19, cfg.hidden_size, dtype=torch.float64)
    got = attn(x, AttnContext())
    torch.testing.assert_close(got, _lightning_reference(attn, x, cfg, layer_idx), rtol=1e-9,
                               atol=1e-9)


def test_moe_matches_dense_loop():
    cfg = ModelConfig.from_preset("debug")
    torch.manual_seed(2)
    moe = MoE(cfg).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(3, 7, cfg.hidden_size, dtype=torch.float64)
    out, aux = moe(x)
    flat = x.reshape(-1, cfg.hidden_size)
    probs = torch.softmax((flat @ moe.gate.weight.t()).float(), -1).double()  # fp32 router
    w, idx = probs.topk(cfg.num_experts_per_tok, -1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.zeros_like(flat)
    i_size = cfg.intermediate_size
    for n in range(flat.shape[0]):
        for j in range(cfg.num_experts_per_tok):
            e = idx[n, j]
            w1 = moe.experts.gate_up_proj[e, :i_size]
            w3 = moe.experts.gate_up_proj[e, i_size:]
            w2 = moe.experts.down_proj[e]
            ref[n] += w[n, j] * (w2 @ (F.silu(w1 @ flat[n]) * (w3 @ flat[n])))
    torch.testing.assert_close(out.reshape(-1, cfg.hidden_size), ref)
    e = cfg.num_local_experts
    f = torch.stack([(idx == i).any(-1).double().mean() for i in range(e)])
    torch.testing.assert_close(aux.double(), e * (f * probs.mean(0)).sum())


def test_token_drop_with_capacity():
    cfg = ModelConfig.from_preset("debug", capacity_factor=0.5)
    torch.manual_seed(3)
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] = 1.0  # most tokens prefer expert 0 -> it overflows
        for p in moe.experts.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(1, 40, cfg.hidden_size).abs()
    out, _ = moe(x)
    capacity = math.ceil(0.5 * 40 * cfg.num_experts_per_tok / cfg.num_local_experts)
    stats = moe.last_stats
    assert stats.dropped > 0
    # dropless in eval mode: same routing, nothing dropped, different output
    moe.eval()
    out_eval, _ = moe(x)
    assert moe.last_stats.dropped == 0
    assert not torch.allclose(out, out_eval)
    # the capacity is respected: re-run the dispatch plan
    from minimax01.ops.moe import dispatch, route

    plan = dispatch(route(moe.gate(x.reshape(-1, cfg.hidden_size)), 2).experts, 4, capacity)
    assert int(plan.counts.max()) <= capacity
    assert plan.dropped == stats.dropped


@pytest.mark.parametrize("postnorm", [True, False])
def test_decoder_layer_residual(postnorm):
    cfg = ModelConfig.from_preset("debug", postnorm=postnorm)
    torch.manual_seed(4)
    layer = DecoderLayer(cfg, 0)
    x = torch.randn(1, 9, cfg.hidden_size)
    ctx = AttnContext()
    got, _ = layer(x, ctx)
    h1 = layer.input_layernorm(x)
    y = (h1 if postnorm else x) * cfg.linear_attn_alpha + layer.self_attn(h1, ctx)
    h2 = layer.post_attention_layernorm(y)
    ref = (h2 if postnorm else y) * cfg.mlp_alpha + layer.mlp(h2)[0]
    torch.testing.assert_close(got, ref)
    expected_alpha = (2 * cfg.num_hidden_layers) ** 0.25 if postnorm else 1.0
    assert cfg.mlp_alpha == pytest.approx(expected_alpha)


def test_text01_alpha_and_meta_build():
    cfg = ModelConfig.from_preset("minimax-text-01")
    assert cfg.linear_attn_alpha == 3.5565588200778455
    assert cfg.layer_types.count(FULL) == 10 and cfg.layer_types[7] == FULL
    model = MiniMaxForCausalLM.from_config_on_meta(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    assert all(p.is_meta for p in model.parameters())


def test_packed_equals_separate():
    model = make_model(5)
    lens = [7, 1, 16, 9]
    docs = [torch.randint(0, 256, (1, n)) for n in lens]
    packed = torch.cat(docs, 1)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    out = model(packed, labels=packed, cu_seqlens=cu)
    per_token = []
    for (a, b), doc in zip(zip(cu[:-1].tolist(), cu[1:].tolist()), docs):
        single = model(doc, labels=doc)
        torch.testing.assert_close(out.logits[:, a:b], single.logits, rtol=1e-5, atol=1e-5)
        per_token.append(model.lm_loss(single.logits, doc, reduction="none")[:-1])
    # the packed loss never predicts a document's first token from the previous document
    packed_tokens = model.lm_loss(out.logits, packed, cu, reduction="none")
    ref = torch.cat(per_token)
    kept = packed_tokens[packed_tokens != 0]
    torch.testing.assert_close(kept.sort().values, ref[ref != 0].sort().values, rtol=1e-5, atol=1e-5)
    assert packed_tokens.numel() - (packed_tokens == 0).sum() == sum(n - 1 for n in lens)


def test_padding_changes_nothing_for_real_tokens():
    model = make_model(6)
    x = torch.randint(0, 256, (1, 12))
    ref = model(x).logits
    padded = torch.cat([torch.full((1, 5), 258), x], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    got = model(padded, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("types", [None, [LINEAR] * 4, [FULL] * 4])
def test_cached_decoding_equals_full_forward(types):
    model = make_model(7, **({"layer_types": types} if types else {}))
    b, t, prefill = 3, 24, 10
    x = torch.randint(0, 256, (b, t))
    # left padding on rows 1 and 2
    pads = [0, 3, 6]
    mask = torch.ones(b, t, dtype=torch.long)
    for row, p in enumerate(pads):
        x[row, :p] = 258
        mask[row, :p] = 0
    full = model(x, attention_mask=mask).logits
    cache = HybridCache(model.config, b, t)
    step = model(x[:, :prefill], attention_mask=mask[:, :prefill], cache=cache).logits
    for row, p in enumerate(pads):
        torch.testing.assert_close(step[row, p:], full[row, p:prefill], rtol=1e-5, atol=1e-5)
    for i in range(prefill, t):
        step = model(x[:, i:i + 1], cache=cache).logits
        torch.testing.assert_close(step[:, 0], full[:, i], rtol=1e-5, atol=1e-5)
    assert cache.seen.tolist() == [t - p for p in pads]


def test_chunked_prefill_with_cache():
    model = make_model(8)
    x = torch.randint(0, 256, (2, 30))
    full = model(x).logits
    cache = HybridCache(model.config, 2, 30)
    parts = [model(x[:, a:b], cache=cache).logits for a, b in ((0, 11), (11, 12), (12, 30))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_batch_equals_one_by_one():
    model = make_model(9)
    prompts = [[1, 2, 3], [10, 20, 30, 40, 50, 60, 70], [99]]
    batched = generate(model, prompts, max_new_tokens=8)
    width = max(len(p) for p in prompts)
    for row, p in enumerate(prompts):
        single = generate(model, [p], max_new_tokens=8)
        assert batched[row, width:].tolist() == single[0, len(p):].tolist()
        assert batched[row, width - len(p):width].tolist() == p


def test_generate_greedy_matches_argmax_of_full_forward():
    model = make_model(10)
    x = torch.randint(0, 256, (1, 6))
    out = generate(model, x, max_new_tokens=5)
    seq = x
    for _ in range(5):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert out.tolist() == seq.tolist()


def test_generate_sampling_seed_and_stop():
    model = make_model(11)
    a = generate(model, [[5, 6]], max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    b = generate(model, [[5, 6]], max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    c = generate(model, [[5, 6]], max_new_tokens=12, temperature=1.0, seed=4)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    stop = a[0, 4].item()
    d = generate(model, [[5, 6]], max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=3,
                 stop_tokens=[stop])
    first = a[0, 2:].tolist().index(stop) + 2
    assert d[0].tolist() == a[0, :first + 1].tolist()


def test_bad_inputs_have_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.zeros(2, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 5]))
    cache = HybridCache(model.config, 1, 4)
    with pytest.raises(ValueError, match="cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=1)
