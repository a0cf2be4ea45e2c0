"""Per-rank checkpoint loading (checkpoint/sliced.py) and the tensor-parallel slicing plan
(parallel/tp_plan.py).

A synthetic checkpoint in the official MiniMax-Text-01 layout (legacy names, 413 shards named
model-000NN-of-00413.safetensors, model.safetensors.index.json, a legacy config.json) of a small
8-layer 7:1 model: every rank of TP 2 and 4 reads exactly its slices (bytes counted at
safe_open's level: no whole-tensor reads, no byte beyond the slices), both dialects and a
pre-quantised checkpoint; a missing shard or tensor fails clearly before anything is read."""

import json
import math

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.checkpoint import CheckpointError
from minimax01.checkpoint.dialects import layout
from minimax01.checkpoint.match import param_shapes_of
from minimax01.checkpoint.sliced import Slice, SlicedReader, sliced_shape
from minimax01.config import hybrid_layer_types
from minimax01.parallel.tp_plan import param_slices, rank_shapes, tp_plan, tp_shape
from minimax01.quant import quantize_model

OFFICIAL_SHARDS = 413


def small_config(**kw):
    fields = dict(vocab_size=256, hidden_size=32, intermediate_size=16, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rotary_dim=4,
                  layer_types=hybrid_layer_types(8, 8), num_local_experts=16,
                  num_experts_per_tok=2, block_size=16, rope_theta=10_000.0, dtype="float32")
    fields.update(kw)
    return ModelConfig(**fields)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(small_config()).eval()


def write_official(model, path, shards=OFFICIAL_SHARDS, drop=()):
    """The official release's layout: legacy tensor names spread in order over `shards` files
    model-{k:05d}-of-{shards:05d}.safetensors (k from 0), an index, a legacy config.json."""
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    pieces = layout({n: tuple(t.shape) for n, t in state.items()}, "legacy")
    names = [n for n in pieces if n not in drop]
    assert len(names) >= shards  # every shard holds something
    files = [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    per_file: dict[str, dict] = {f: {} for f in files}
    weight_map = {}
    for j, name in enumerate(names):
        p = pieces[name]
        t = state[p.param]
        f = files[j * shards // len(names)]
        per_file[f][name] = (t[p.index] if p.index else t).contiguous().clone()
        weight_map[name] = f
    for f, tensors in per_file.items():
        save_file(tensors, str(path / f), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    cfg = model.config.to_hf_config("legacy")
    cfg["shared_intermediate_size"] = [0]  # as the official Text-01 config.json writes it
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def official(model, tmp_path_factory):
    return write_official(model, tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def hf_ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, dialect="hf", max_shard_size="20KB")
    return path


class CountingOpen:
    """Wraps safetensors.safe_open: bytes each read returns; whole-tensor reads recorded."""

    def __init__(self):
        self.bytes = 0
        self.whole = []
        self.real = safetensors.safe_open

    def __call__(self, *args, **kwargs):
        return _Handle(self.real(*args, **kwargs), self)


class _Handle:
    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def keys(self):
        return self.inner.keys()

    def get_tensor(self, name):
        t = self.inner.get_tensor(name)
        self.counter.whole.append(name)
        self.counter.bytes += t.numel() * t.element_size()
        return t

    def get_slice(self, name):
        return _Slice(self.inner.get_slice(name), self.counter)

    def __exit__(self, *a):
        return self.inner.__exit__(*a)


class _Slice:
    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def get_shape(self):
        return self.inner.get_shape()

    def get_dtype(self):
        return self.inner.get_dtype()

    def __getitem__(self, index):
        t = self.inner[index]
        self.counter.bytes += t.numel() * t.element_size()
        return t


@pytest.fixture
def counting(monkeypatch):
    c = CountingOpen()
    monkeypatch.setattr(safetensors, "safe_open", c)
    return c


def cut(t, slices):
    """The reference slicing: narrow + cat, one dim at a time."""
    for s in slices:
        t = torch.cat([t.narrow(s.dim, a, b - a) for a, b in s.ranges], dim=s.dim)
    return t


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------ reading per rank
@pytest.mark.parametrize("which", ["official", "hf_ckpt"])
@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_reads_exactly_its_slices(request, model, which, tp, counting):
    path = request.getfixturevalue(which)
    full = model.state_dict()
    total = nbytes(full)
    union_bytes = 0
    for rank in range(tp):
        counting.bytes, counting.whole = 0, []
        with SlicedReader(path) as r:
            plan = tp_plan(r.param_shapes, model.config, tp, rank)
            got = r.load(plan)
            assert r.bytes_read == nbytes(got)
        assert counting.whole == []                    # never a whole-tensor read
        assert counting.bytes == nbytes(got)           # not a byte beyond the slices
        for name, slices in plan.items():
            assert torch.equal(got[name], cut(full[name], slices)), name
        replicated = sum(full[n].numel() * 4 for n, s in plan.items() if s == ())
        kv = sum(full[n].numel() * 4 for n in plan if ".k_proj." in n or ".v_proj." in n)
        hkv = model.config.num_key_value_heads  # KV heads replicate beyond TP = Hkv
        assert nbytes(got) == (total - replicated - kv) / tp + replicated + kv / min(tp, hkv)
        union_bytes += nbytes(got)
    assert union_bytes >= total


def test_ranks_reassemble_the_model(model, official):
    """Per parameter, the ranks' parts put back together (per the plan) are the full tensor;
    KV heads replicated at TP 4 > Hkv 2."""
    cfg = model.config
    full = model.state_dict()
    tp = 4
    parts = []
    with SlicedReader(official) as r:
        for rank in range(tp):
            parts.append(r.load(tp_plan(r.param_shapes, cfg, tp, rank)))
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert torch.equal(torch.cat([p[qkv] for p in parts]), full[qkv])
    # each rank's qkv rows are its heads' q|k|v blocks (SPEC §3 interleave)
    per_head = full[qkv].view(cfg.num_attention_heads, 3, cfg.head_dim, -1)
    assert torch.equal(parts[1][qkv].view(1, 3, cfg.head_dim, -1), per_head[1:2])
    k = "model.layers.7.self_attn.k_proj.weight"
    assert torch.equal(parts[0][k], parts[1][k]) and torch.equal(parts[2][k], parts[3][k])
    assert torch.equal(torch.cat([parts[0][k], parts[2][k]]), full[k])
    gu = "model.layers.3.mlp.experts.gate_up_proj"
    i = cfg.intermediate_size
    w1 = torch.cat([p[gu][:, : i // tp] for p in parts], 1)
    w3 = torch.cat([p[gu][:, i // tp:] for p in parts], 1)
    assert torch.equal(torch.cat([w1, w3], 1), full[gu])
    dn = "model.layers.3.mlp.experts.down_proj"
    assert torch.equal(torch.cat([p[dn] for p in parts], 2), full[dn])
    out = "model.layers.0.self_attn.out_proj.weight"
    assert torch.equal(torch.cat([p[out] for p in parts], 1), full[out])
    emb = "model.embed_tokens.weight"
    assert torch.equal(torch.cat([p[emb] for p in parts]), full[emb])


def test_expert_parallel_reads_only_its_experts(model, official, counting):
    with SlicedReader(official) as r:
        plan = tp_plan(r.param_shapes, model.config, 4, 2, expert_parallel=True)
        got = r.load({n: s for n, s in plan.items() if ".experts." in n})
    e = model.config.num_local_experts
    full = model.state_dict()
    expert_bytes = sum(t.numel() * 4 for n, t in full.items() if ".experts." in n)
    assert counting.bytes == expert_bytes // 4 and counting.whole == []
    gu = "model.layers.5.mlp.experts.gate_up_proj"
    assert torch.equal(got[gu], full[gu][e // 2: 3 * e // 4])


def test_read_arbitrary_parts_and_dtype(model, official):
    full = model.state_dict()
    gu = "model.layers.2.mlp.experts.gate_up_proj"
    slices = (Slice.ids(0, [5, 6, 7, 1]), Slice(1, ((3, 9), (20, 22))), Slice.range(2, 4, 30))
    assert Slice.ids(0, [5, 6, 7, 1]).ranges == ((5, 8), (1, 2))
    with SlicedReader(official) as r:
        got = r.read(gu, slices, dtype=torch.bfloat16)
        assert got.dtype == torch.bfloat16 and got.shape == sliced_shape(full[gu].shape, slices)
        assert torch.equal(got, cut(full[gu], slices).bfloat16())
        whole = r.read("model.norm.weight")
        assert torch.equal(whole, full["model.norm.weight"])


def test_prequantized_checkpoint_slices(model, tmp_path):
    qmodel = MiniMaxForCausalLM(model.config).eval()
    qmodel.load_state_dict(model.state_dict())
    quantize_model(qmodel, "int8")
    qmodel.save_pretrained(tmp_path / "q", dialect="legacy", max_shard_size="30KB")
    full = qmodel.state_dict()
    with SlicedReader(tmp_path / "q") as r:
        assert r.quantization.format == "int8"
        plan = tp_plan(r.param_shapes, model.config, 2, 1)
        assert plan["model.layers.0.mlp.experts.down_proj_scale"] == ()      # column split
        assert plan["model.layers.0.self_attn.qkv_proj.weight_scale"][0].ranges == ((48, 96),)
        got = r.load(plan, dtype=torch.bfloat16)
    for name, slices in plan.items():
        want = cut(full[name], slices)
        if want.dtype == torch.float32 and not name.endswith("_scale"):
            want = want.bfloat16()
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


# ------------------------------------------------------------------ failures
def test_missing_shard_is_named(model, tmp_path):
    path = write_official(model, tmp_path / "c")
    (path / "model-00123-of-00413.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00123-of-00413.safetensors"):
        SlicedReader(path)


def test_missing_tensor_fails_before_reading(model, tmp_path, counting):
    lost = "model.layers.6.block_sparse_moe.experts.9.w3.weight"
    path = write_official(model, tmp_path / "c", drop={lost})
    with SlicedReader(path) as r:
        plan = tp_plan(r.param_shapes, model.config, 2, 0)
        counting.bytes = 0
        with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): " + lost.replace(".", r"\.")):
            r.load(plan)
        assert counting.bytes == 0 and r.bytes_read == 0
        # a plan that does not need the lost tensor still works
        ok = {n: s for n, s in plan.items() if "layers.6.mlp.experts.gate_up" not in n}
        r.load(ok)


def test_bad_plans_are_refused(official):
    with SlicedReader(official) as r:
        with pytest.raises(ValueError, match="unknown model parameter"):
            r.load({"model.layers.0.mlp.w9": ()})
        with pytest.raises(ValueError, match=r"range \[0, 999\) of dim 0"):
            r.load({"model.norm.weight": (Slice.range(0, 0, 999),)})
        with pytest.raises(ValueError, match="slice dim 3"):
            r.read("model.norm.weight", (Slice.range(3, 0, 1),))


# ------------------------------------------------------------------ the plan (pure)
def test_text01_plan_tp8():
    cfg = ModelConfig.from_preset("minimax-text-01")
    with torch.device("meta"):
        shapes = param_shapes_of(MiniMaxForCausalLM(cfg))
    s = tp_shape(cfg, 8)
    assert (s.heads, s.kv_heads, s.kv_replicas, s.intermediate, s.vocab) == (8, 1, 1, 1152, 25008)
    plan = tp_plan(shapes, cfg, 8, 3)
    assert plan["model.layers.0.self_attn.qkv_proj.weight"] == (Slice.range(0, 3 * 3072, 4 * 3072),)
    assert plan["model.layers.0.self_attn.out_proj.weight"] == (Slice.range(1, 3072, 4096),)
    assert plan["model.layers.0.self_attn.norm.weight"] == (Slice.range(0, 3072, 4096),)
    assert plan["model.layers.7.self_attn.k_proj.weight"] == (Slice.range(0, 384, 512),)
    assert plan["model.layers.9.mlp.experts.gate_up_proj"] == \
        (Slice(1, ((3456, 4608), (9216 + 3456, 9216 + 4608))),)
    assert plan["model.layers.9.mlp.experts.down_proj"] == (Slice.range(2, 3456, 4608),)
    assert plan["lm_head.weight"] == (Slice.range(0, 3 * 25008, 4 * 25008),)
    assert plan["model.layers.9.mlp.gate.weight"] == () == plan["model.norm.weight"]
    shard = rank_shapes(shapes, plan)
    per_rank = sum(math.prod(v) for v in shard.values())
    total = sum(math.prod(v) for v in shapes.values())
    replicated = sum(math.prod(shapes[n]) for n, sl in plan.items() if sl == ())
    assert per_rank == (total - replicated) // 8 + replicated


def test_plan_kv_replication_and_errors():
    cfg = ModelConfig.from_preset("minimax-text-01")
    s = tp_shape(cfg, 16)
    assert (s.heads, s.kv_heads, s.kv_replicas) == (4, 1, 2)
    k = "model.layers.7.self_attn.k_proj.weight"
    for rank in range(16):  # ranks 2j, 2j+1 hold KV head j, the one their query heads use
        (sl,) = param_slices(k, cfg, 16, rank)
        kv = sl.ranges[0][0] // 128
        assert kv == rank // 2 == (rank * 4) // 8
    with pytest.raises(ValueError, match="num_attention_heads=64"):
        tp_shape(cfg, 3)
    with pytest.raises(ValueError, match="num_key_value_heads=8"):
        tp_shape(cfg.replace(num_attention_heads=96), 12)
    with pytest.raises(ValueError, match="num_local_experts=32"):
        tp_shape(cfg, 64, expert_parallel=True)
    with pytest.raises(ValueError, match="rank 8"):
        param_slices(k, cfg, 8, 8)
    with pytest.raises(ValueError, match="no tensor-parallel rule"):
        param_slices("model.layers.0.mlp.shared_expert.weight", cfg, 8, 0)
    ragged = tp_shape(cfg.replace(vocab_size=1001), 8)
    assert ragged.vocab == 126
    assert param_slices("lm_head.weight", cfg.replace(vocab_size=1001), 8, 7) == \
        (Slice.range(0, 882, 1001),)
