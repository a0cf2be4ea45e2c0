"""8-bit models (minimax01/quant, checkpoint/quantized.py): per-layer error bounds against the
16-bit model on random and structured weights, the module swap, pre-quantised save -> load round
trips (exact), quantisation while loading a 16-bit checkpoint (piece by piece: never the whole
16-bit model), the on-disk rewrite, and the errors."""

import json

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.checkpoint import CheckpointError, CheckpointReader
from minimax01.checkpoint.quantized import quantize_checkpoint
from minimax01.model.layers import AttnContext
from minimax01.ops.rope import rope_cos_sin
from minimax01.quant import (QuantConfig, QuantizedExperts, QuantizedLinear, quantization_of,
                             quantize_model, set_backend)
from minimax01.infer.prepare import prepare_for_serving

FORMATS = ("int8", "fp8")
# Relative error bounds of one block's output against the 16-bit block (W8A16, per channel).
# Round-to-nearest per output channel costs a matmul about max|row| / (levels * sqrt(12) * rms)
# of its output: ~0.6% for int8 on Gaussian rows, ~2.5% for e4m3 (3 mantissa bits); a block
# chains two or three matmuls. Measured here: int8 <= 0.023, fp8 <= 0.09 (outlier weights).
LAYER_BOUND = {"int8": 0.03, "fp8": 0.12}
LOGITS_BOUND = {"int8": 0.01, "fp8": 0.03}  # measured 0.0022 / 0.0099


def make_model(seed=0, structured=None, **overrides):
    torch.manual_seed(seed)
    m = MiniMaxForCausalLM(ModelConfig.from_preset("debug", **overrides)).eval()
    if structured:
        with torch.no_grad():
            for layer in m.model.layers:
                ex = layer.mlp.experts
                if structured == "outliers":   # a few output channels 30x larger
                    ex.gate_up_proj[:, ::9] *= 30
                    ex.down_proj[:, ::11] *= 30
                    attn = layer.self_attn
                    (attn.qkv_proj if hasattr(attn, "qkv_proj") else attn.q_proj).weight[::5] *= 30
                elif structured == "zero_rows":
                    ex.gate_up_proj[:, 1::4] = 0
                    ex.down_proj[2] = 0         # a dead expert
    return m


def clone(model):
    m = MiniMaxForCausalLM(model.config).eval()
    m.load_state_dict(model.state_dict())
    return m


def same(a, b) -> bool:
    """Bit-exact equality, also for float8 tensors."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def layer_inputs(model, t=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, model.config.hidden_size, generator=g)
    cos, sin = rope_cos_sin(torch.arange(t), model.config.rotary_dim, model.config.rope_theta)
    return x, AttnContext(cos=cos, sin=sin)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("structured", [None, "outliers", "zero_rows"])
def test_per_layer_error_bound(fmt, structured):
    """Every decoder layer, its attention and its MoE block alone, against the 16-bit layer on
    the same input: within LAYER_BOUND, on random and structured weights."""
    ref = make_model(structured=structured)
    q = quantize_model(clone(ref), fmt)
    x, ctx = layer_inputs(ref)
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(ref.model.layers, q.model.layers)):
            h = a.input_layernorm(x)
            assert rel(b.self_attn(h, ctx), a.self_attn(h, ctx)) < LAYER_BOUND[fmt], (i, "attn")
            assert rel(b.mlp(h)[0], a.mlp(h)[0]) < LAYER_BOUND[fmt], (i, "moe")
            assert rel(b(x, ctx)[0], a(x, ctx)[0]) < LAYER_BOUND[fmt], (i, "layer")
        if structured != "outliers":  # 30x weights make the toy model chaotic end to end
            ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
            assert rel(q(ids).logits, ref(ids).logits) < LOGITS_BOUND[fmt]


def test_swap_keeps_16bit_parts_and_experts_only():
    ref = make_model()
    q = quantize_model(clone(ref), "int8", modules=("experts",))
    assert quantization_of(q) == QuantConfig("int8", ("experts",))
    layer = q.model.layers[0]
    assert isinstance(layer.mlp.experts, QuantizedExperts)
    assert isinstance(layer.self_attn.qkv_proj, torch.nn.Linear)
    quantize_model(q, "int8")  # now attention too; experts untouched
    assert isinstance(layer.self_attn.qkv_proj, QuantizedLinear)
    assert isinstance(q.model.layers[1].self_attn.q_proj, QuantizedLinear)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight",
                 "model.norm.weight", "model.layers.0.self_attn.norm.weight"):
        assert torch.equal(q.state_dict()[name], ref.state_dict()[name]), name
    assert all(p.dtype == torch.float32 for p in q.parameters())  # 8-bit tensors are buffers
    sd = q.state_dict()
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.int8
    assert sd["model.layers.0.mlp.experts.gate_up_proj_scale"].shape == (4, 128)
    assert sd["model.layers.0.self_attn.qkv_proj.weight_scale"].shape == (192,)
    assert quantize_model(q, None) is q and quantize_model(q, "none") is q
    with pytest.raises(ValueError, match="int8, fp8 or none"):
        quantize_model(q, "int4")
    with pytest.raises(ValueError, match="subset"):
        QuantConfig("int8", ("router",))


def test_serving_pipeline_matches_local_forward():
    """Quantised experts under the sync-free serving configuration of the MoE pipeline (what the
    engine installs on CUDA) equal the default pipeline."""
    q = quantize_model(make_model(), "fp8")
    ids = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = q(ids).logits
        restore = prepare_for_serving(q, sync_free=True)
        assert all(layer.mlp.pipeline.sync_free for layer in q.model.layers)
        got = q(ids).logits
        restore()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_triton_backend_in_the_model():
    """The whole quantised model through the Triton kernels (interpreter) equals the twin."""
    q = quantize_model(make_model(num_hidden_layers=2, layer_types=["linear_attention",
                                                                    "full_attention"]), "int8")
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = q(ids).logits
        set_backend(q, "triton")
        got = q(ids).logits
    assert rel(got, want) < 1e-5


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dialect", ["legacy", "hf"])
def test_prequantized_round_trip_exact(tmp_path, fmt, dialect):
    q = quantize_model(make_model(structured="outliers"), fmt)
    q.save_pretrained(tmp_path, dialect=dialect, max_shard_size="40KB")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == fmt
    assert cfg["quantization_config"]["modules"] == ["experts", "attention"]
    with CheckpointReader(tmp_path) as r:
        codes = {e.dtype for n, e in r.entries.items() if n.endswith("w1.weight")
                 or n.endswith("gate_up_proj")}
        assert codes == {"I8" if fmt == "int8" else "F8_E4M3"}
        if dialect == "legacy":
            assert r.entries["model.layers.0.block_sparse_moe.experts.3.w1.weight_scale"].shape == (64,)
        else:
            assert r.entries["model.layers.0.mlp.experts.gate_up_proj_scale"].shape == (4, 128)
    back = MiniMaxForCausalLM.from_pretrained(tmp_path)
    assert quantization_of(back) == quantization_of(q)
    a, b = q.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert same(a[k], b[k]), k
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
    again = MiniMaxForCausalLM.from_pretrained(tmp_path, quantization=fmt)  # same thing asked
    assert torch.equal(again.state_dict()["lm_head.weight"], a["lm_head.weight"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dialect", ["legacy", "hf"])
def test_load_time_quantisation_equals_quantize_model(tmp_path, fmt, dialect, monkeypatch):
    ref = make_model(structured="zero_rows")
    ref.save_pretrained(tmp_path, dialect=dialect)
    reads = []
    original = CheckpointReader.read

    def spy(self, name, index=()):
        t = original(self, name, index)
        reads.append((name, t.numel()))
        return t

    monkeypatch.setattr(CheckpointReader, "read", spy)
    loaded = MiniMaxForCausalLM.from_pretrained(tmp_path, quantization=fmt)
    want = quantize_model(clone(ref), fmt)
    a, b = want.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert same(a[k], b[k]), k
    # the 16-bit experts came in one expert (or one w1/w3/w2) at a time, never stacked
    cfg = ref.config
    one_expert = 2 * cfg.intermediate_size * cfg.hidden_size
    expert_reads = [n for name, n in reads if "expert" in name]
    assert expert_reads and max(expert_reads) <= one_expert


def test_quantize_checkpoint_on_disk_equals_save_of_quantized(tmp_path):
    ref = make_model()
    ref.save_pretrained(tmp_path / "bf", dialect="hf")
    files = quantize_checkpoint(tmp_path / "bf", tmp_path / "q8", "int8", dialect="legacy",
                                max_shard_size="50KB")
    assert len(files) > 1
    quantize_model(clone(ref), "int8").save_pretrained(tmp_path / "direct", dialect="legacy",
                                                       max_shard_size="50KB")
    a = MiniMaxForCausalLM.from_pretrained(tmp_path / "q8").state_dict()
    b = MiniMaxForCausalLM.from_pretrained(tmp_path / "direct").state_dict()
    for k in a:
        assert same(a[k], b[k]), k
    with pytest.raises(ValueError, match="already quantised"):
        quantize_checkpoint(tmp_path / "q8", tmp_path / "again", "int8")
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(tmp_path / "bf", tmp_path / "q8", "int8")


def test_quantisation_request_errors(tmp_path, monkeypatch):
    q = quantize_model(make_model(), "int8")
    q.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="holds int8 weights, not fp8"):
        MiniMaxForCausalLM.from_pretrained(tmp_path / "q", quantization="fp8")
    with pytest.raises(ValueError, match="quantization='none'"):
        MiniMaxForCausalLM.from_pretrained(tmp_path / "q", quantization="none")
    make_model().save_pretrained(tmp_path / "bf")
    with pytest.raises(ValueError, match="int8, fp8 or none"):
        MiniMaxForCausalLM.from_pretrained(tmp_path / "bf", quantization="int3")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method 'gptq' is not supported"):
        MiniMaxForCausalLM.from_pretrained(tmp_path / "q")
    import minimax01.quant.apply as apply

    def no_fp8(*a, **k):
        raise RuntimeError("float8 not implemented for this CPU")

    monkeypatch.setattr(apply, "fp8_dtype", lambda: torch.float8_e4m3fn)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: no_fp8())
    with pytest.raises(ValueError, match="fp8 weights are not supported on cpu"):
        apply.check_supported("fp8", "cpu")


def test_prequantized_checkpoint_problems_are_named(tmp_path):
    q = quantize_model(make_model(), "int8")
    q.save_pretrained(tmp_path, dialect="hf")
    from safetensors.torch import load_file, save_file

    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    tensors.pop("model.layers.1.mlp.experts.down_proj_scale")
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = \
        tensors["model.layers.0.mlp.experts.gate_up_proj"].float()
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        MiniMaxForCausalLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "model.layers.1.mlp.experts.down_proj_scale" in msg
    assert "gate_up_proj (dtype F32, expected I8)" in msg


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_matches_generate(fmt, device):
    """The serving engine on a quantised model (on a GPU: sync-free quantised dispatch, CUDA-graph
    decode, Triton kernels) decodes greedily like generate() on the same model (fp32)."""
    from minimax01.infer.engine import Engine
    from minimax01.infer.generate import generate
    from minimax01.infer.request import SamplingParams

    model = quantize_model(make_model().to(device), fmt)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    want = [generate(model, [p], max_new_tokens=8)[0, len(p):].tolist() for p in prompts]
    eng = Engine(model, max_context=64, num_slots=4)
    got = eng.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [c.token_ids for c in got] == want
