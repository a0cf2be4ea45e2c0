"""Tensor-parallel inference equals one process (gloo, CPU, fp32), TP = 2 and 4.

One forked group per TP size runs every case (parallel/tensor_parallel.py, infer/tp_engine.py):

  * the serving engine: rank 0's TPEngine broadcasts each step's record, the other ranks follow;
    several requests, more than the slots (slots reset and reused), prompts longer than a
    prefill chunk and packed together (varlen prefill), shared prefixes (prefix cache loads,
    snapshots and evictions reach every rank), paged K/V at TP 2 (block tables in the record):
    the logits of every step within 1e-5 relative of a one-process Engine, greedy tokens
    identical;
  * collectives per forward, counted at torch.distributed: 1 (embedding) + one all-reduce per
    sub-layer (attention and MoE of every layer) and one all-gather (logits); the unfused
    lightning norm adds its own per lightning layer;
  * the model with a HybridCache (padded batch prefill, then decode steps) for the unfused norm,
    expert parallel and int8 weights, and in the serving (sync-free, CUDA-graph) form of the MoE
    pipeline;
  * loading per rank from a synthetic checkpoint in the official sharded layout (legacy names,
    413 shards, index) and from a pre-quantised int8 checkpoint (hf dialect), plain and expert
    parallel, and a 16-bit checkpoint quantised to int8 while each rank loads;
  * `generate` as a rank (torchrun's environment): the same seeded sample as one process;
  * benchmarks/tp_serving.py --tiny --device cpu (TP 2): its correctness check and every row.

With 4 query heads and 2 KV heads, TP 2 splits the KV heads and TP 4 replicates them; a 250-token
vocabulary leaves TP 4's last shard shorter (padded logits)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_workers
from test_sliced_load import small_config, write_official
from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.config import hybrid_layer_types
from minimax01.infer.engine import Engine
from minimax01.infer.prepare import prepare_for_serving
from minimax01.infer.request import SamplingParams
from minimax01.infer.tp_engine import StepChannel, follow, rank_engine
from minimax01.model.cache import HybridCache
from minimax01.parallel.tensor_parallel import load_tp_model, parallelize_for_inference
from minimax01.parallel.tp_modules import TPGroup
from minimax01.cli import main
from minimax01.quant import quantize_model
from minimax01.tokenizer import ByteTokenizer

TOL = 1e-5
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "tp_serving.py"
GENERATE = ["generate", "--prompt", "hello", "--no-bos", "--max-new-tokens", "12",
            "--temperature", "0.8", "--seed", "3", "--device", "cpu"]


def config() -> ModelConfig:
    return ModelConfig(vocab_size=250, hidden_size=32, intermediate_size=16, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, rotary_dim=4,
                       layer_types=hybrid_layer_types(4, 2), num_local_experts=4,
                       num_experts_per_tok=2, block_size=8, dtype="float32",
                       rope_theta=10_000.0)


def full_model(seed=0, cfg=None):
    torch.manual_seed(seed)
    return MiniMaxForCausalLM(cfg or config()).eval()


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def prompts(lengths, vocab=250, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


class Recorder:
    """Wraps an engine's sampling to keep every step's logits and rows."""

    def __init__(self, engine):
        self.steps, inner = [], engine._sample

        def sample(rows, logits):
            self.steps.append(([s.request_id for s in rows], logits.clone()))
            return inner(rows, logits)

        engine._sample = sample


# ------------------------------------------------------------------------------ cases
def engine_case(rank, world, control):
    full = full_model()
    tp = TPGroup()
    model = parallelize_for_inference(full, tp)
    kw = dict(num_slots=3, max_context=96, prefill_chunk=16, prefix_block_size=8,
              kv_page_size=8 if world == 2 else None)  # TP 2: paged K/V, rank 0's pages
    channel = StepChannel(control)
    engine = rank_engine(model, None, channel, rank, **kw)
    if rank != 0:
        assert follow(engine, channel) > 0
        return
    ps = prompts([5, 23, 1, 40, 9])
    ps += [ps[3][:20] + ps[1][:7], ps[3] + ps[0]]  # shared prefixes: prefix cache hits
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ref = Engine(full, **kw)
    rec_ref, rec_tp = Recorder(ref), Recorder(engine)
    want = ref.generate(ps, params) + ref.generate(ps[3:], params)
    got = engine.generate(ps, params) + engine.generate(ps[3:], params)
    # the prefix cache's operations reached every rank (hits, snapshots, evictions under a
    # budget of a few blocks)
    assert engine.prefix_cache.stats["hit_tokens"] == ref.prefix_cache.stats["hit_tokens"] > 0
    steps = len(rec_ref.steps)  # (below, the ranks' cache sizes differ: so may evictions)
    engine.prefix_cache.budget_bytes = 4 * engine.prefix_cache.kv_bytes
    ref.prefix_cache.budget_bytes = 4 * ref.prefix_cache.kv_bytes
    fresh = prompts([40, 33], seed=7)
    want += ref.generate(fresh + ps[::-1], params)
    got += engine.generate(fresh + ps[::-1], params)
    assert engine.prefix_cache.stats["evicted_nodes"] > 0
    assert set(engine.prefix_store.kv) == {n.id for n in engine.prefix_cache.nodes.values()}
    channel.stop()
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(len(o.token_ids) == 6 for o in got)
    assert len(rec_tp.steps[:steps]) == steps > 6
    # without the cache: the same tokens
    plain = Engine(full, **{**kw, "prefix_cache": False})
    assert [o.token_ids for o in plain.generate(ps, params)] == [o.token_ids for o in got[:7]]
    packed = 0
    ids = {a.request_id: b.request_id for a, b in zip(got, want)}
    for (rows_t, lt), (rows_r, lr) in zip(rec_tp.steps[:steps], rec_ref.steps[:steps]):
        assert [ids[r] for r in rows_t] == rows_r and lt.shape == lr.shape
        assert rel(lt, lr) <= TOL, rel(lt, lr)
        packed += len(rows_t) > 1
    assert packed  # steps sampled several rows (decode + finished prefills)


class Counter:
    """Counts the calls of torch.distributed's all-reduce and all-gather while active."""

    def __init__(self):
        self.calls = {"all_reduce": 0, "all_gather": 0}
        self.real_reduce = dist.all_reduce
        self.real_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def __enter__(self):
        def reduce(*a, **k):
            self.calls["all_reduce"] += 1
            return self.real_reduce(*a, **k)

        def gather(*a, **k):
            self.calls["all_gather"] += 1
            return self.real_gather(*a, **k)

        dist.all_reduce = reduce
        self.names = [n for n in ("all_gather_single", "all_gather_into_tensor")
                      if hasattr(dist, n)]
        self.saved = {n: getattr(dist, n) for n in self.names}
        for n in self.names:
            setattr(dist, n, gather)
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.real_reduce
        for n, f in self.saved.items():
            setattr(dist, n, f)


def count_case(rank, world):
    full = full_model()
    cfg = full.config
    n_lin = cfg.num_linear_layers
    ids = torch.tensor([prompts([7, 4, 9], seed=3)[0] + prompts([4], seed=4)[0]])
    cu = torch.tensor([0, 7, 11], dtype=torch.int32)
    for fused in (True, False):
        tp = TPGroup()
        model = parallelize_for_inference(full, tp, fused_norm=fused)
        with torch.inference_mode(), Counter() as c:
            got = model(ids, cu_seqlens=cu).logits
        want = 1 + 2 * cfg.num_hidden_layers + (0 if fused else n_lin)
        assert c.calls == {"all_reduce": want, "all_gather": 1}, (fused, c.calls)
        assert tp.counts == c.calls
        assert rel(got, full(ids, cu_seqlens=cu).logits) <= TOL


def cached_generation(model, batch, steps=4):
    """Prefill a left-padded batch into a HybridCache, then `steps` decode steps of the given
    tokens; returns the logits of every step."""
    b = len(batch)
    width = max(map(len, batch))
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    cache = HybridCache(model.config, b, width + steps, dtype=torch.float32)
    out = []
    with torch.inference_mode():
        logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]
        out.append(logits)
        g = torch.Generator().manual_seed(5)
        for _ in range(steps):
            tok = torch.randint(0, model.config.vocab_size, (b, 1), generator=g)
            out.append(model(tok, cache=cache).logits[:, -1])
    return out


def variants_case(rank, world):
    full = full_model(seed=2)
    batch = prompts([6, 13, 2], seed=6)
    ref = cached_generation(full, batch)
    int8 = quantize_model(full_model(seed=2), "int8")
    ref8 = cached_generation(int8, batch)
    assert rel(ref8[0], ref[0]) > 1e-4  # int8 is visibly another model
    for name, source, kw, want in (("unfused norm", full, dict(fused_norm=False), ref),
                                   ("expert parallel", full, dict(expert_parallel=True), ref),
                                   ("int8", int8, {}, ref8),
                                   ("int8 expert parallel", int8, dict(expert_parallel=True),
                                    ref8)):
        got = cached_generation(parallelize_for_inference(source, TPGroup(), **kw), batch)
        for step, (a, b) in enumerate(zip(got, want)):
            assert rel(a, b) <= TOL, (name, step, rel(a, b))
    # the serving (CUDA-graph) form of the pipelines, run here on the CPU: sync-free matmuls,
    # the reduce kept, and expert parallel's sync-free row block (gather, local counts, scatter)
    for ep in (False, True):
        model = parallelize_for_inference(full, TPGroup(), expert_parallel=ep)
        restore = prepare_for_serving(model, sync_free=True)
        for layer in model.model.layers:
            assert layer.mlp.pipeline.sync_free and layer.mlp.pipeline.reduce is not None
            if ep:
                layer.mlp.pipeline.exchange.sync_free = True
        for step, (a, b) in enumerate(zip(cached_generation(model, batch), ref)):
            assert rel(a, b) <= TOL, ("sync-free", ep, step, rel(a, b))
        restore()


def checkpoint_case(rank, world, official, int8_hf):
    ids = torch.tensor([prompts([12], vocab=256, seed=7)[0]])
    for path, kw in ((official, {}), (official, dict(expert_parallel=True)), (int8_hf, {})):
        ref = MiniMaxForCausalLM.from_pretrained(path)
        model = load_tp_model(path, TPGroup(), **kw)
        assert model.config.num_attention_heads == ref.config.num_attention_heads // world
        with torch.inference_mode():
            assert rel(model(ids).logits, ref(ids).logits) <= TOL, (path, kw)
        if path == int8_hf:
            e = model.model.layers[0].mlp.experts
            assert e.gate_up_proj.dtype == torch.int8
            assert e.gate_up_proj.shape[1] == 2 * ref.config.intermediate_size // world
    # a 16-bit checkpoint quantised while loading, per rank: row-split weights get exactly the
    # bytes one process gets; input-split ones (out_proj, down_proj) per-rank row scales
    ref = MiniMaxForCausalLM.from_pretrained(official, quantization="int8")
    model = load_tp_model(official, TPGroup(), quantization="int8")
    rows = model.model.layers[0].self_attn.qkv_proj
    part = 3 * ref.config.head_dim * ref.config.num_attention_heads // world
    want = ref.model.layers[0].self_attn.qkv_proj
    assert torch.equal(rows.weight, want.weight[rank * part:(rank + 1) * part])
    assert torch.equal(rows.weight_scale, want.weight_scale[rank * part:(rank + 1) * part])
    with torch.inference_mode():
        got, exp = model(ids).logits, ref(ids).logits
    assert rel(got, exp) <= 3e-2 and got.argmax(-1).eq(exp.argmax(-1)).float().mean() >= 0.9


def generate_case(rank, world, official, out_dir):
    """`generate` under torchrun's environment: this process is a rank; rank 0 prints."""
    out = out_dir / f"generate.{world}.{rank}.txt"
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        assert main(GENERATE + ["--checkpoint", str(official)]) == 0


def bench_case(rank, world, out_dir):
    """benchmarks/tp_serving.py --tiny --device cpu (what torchrun would run on each rank)."""
    spec = importlib.util.spec_from_file_location("tp_serving", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with open(out_dir / f"bench.{rank}.txt", "w") as f, contextlib.redirect_stdout(f):
        assert bench.main(["--tiny", "--device", "cpu", "--json",
                           str(out_dir / "bench.json")]) == 0


def _all_cases(rank, world, official, int8_hf, out_dir):
    control = dist.new_group(backend="gloo")
    engine_case(rank, world, control)
    count_case(rank, world)
    variants_case(rank, world)
    checkpoint_case(rank, world, official, int8_hf)
    generate_case(rank, world, official, out_dir)
    if world == 2:
        bench_case(rank, world, out_dir)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(small_config()).eval()
    official = write_official(model, tmp_path_factory.mktemp("official"))
    ByteTokenizer().save(official)
    int8_hf = tmp_path_factory.mktemp("int8hf")
    quantize_model(model, "int8").save_pretrained(int8_hf, dialect="hf", max_shard_size="40KB")
    return official, int8_hf


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_equals_one_process(world, checkpoints, tmp_path, capsys):
    official, _ = checkpoints
    run_workers(_all_cases, world, *checkpoints, tmp_path)
    # generate: rank 0 printed one process's text (sampled, seeded), the other ranks nothing
    assert main(GENERATE + ["--checkpoint", str(official)]) == 0
    want = capsys.readouterr().out
    assert len(want) > len("hello") and (tmp_path / f"generate.{world}.0.txt").read_text() == want
    assert all((tmp_path / f"generate.{world}.{r}.txt").read_text() == "" for r in range(1, world))
    if world == 2:  # the benchmark's smoke mode: correct, and every row measured
        report = json.loads((tmp_path / "bench.json").read_text())
        assert report["ok"] and report["tp"] == 2
        rows = {r["what"]: r for r in report["rows"]}
        check = rows["greedy TP == TP 1 (small fp32-activation model)"]["value"]
        assert "identical tokens" in check
        decode = [r for w, r in rows.items() if w.startswith("decode step")]
        prefill = [r for w, r in rows.items() if w.startswith("prefill")]
        assert len(decode) == 4 and all(r["ms"] > 0 for r in decode)
        assert len(prefill) == 2 and all(r["tok_s"] > 0 for r in prefill)
        assert any("collectives" in r["value"] for r in decode)


def test_plan_errors_name_the_field():
    cfg = config()
    with pytest.raises(ValueError, match="num_attention_heads"):
        parallelize_for_inference(MiniMaxForCausalLM.from_config_on_meta(cfg), _Fake(3))
    with pytest.raises(ValueError, match="num_local_experts"):
        parallelize_for_inference(MiniMaxForCausalLM.from_config_on_meta(
            cfg.replace(num_local_experts=2)), _Fake(4), expert_parallel=True)


class _Fake(TPGroup):
    def __init__(self, size):
        super().__init__()
        self.size, self.rank = size, 0


def test_step_record_round_trip_and_refuses_garbage():
    from minimax01.infer.step_record import StepRecord

    r = StepRecord(reset=[2], decode_tokens=[5, 6], decode_slots=[0, 1], decode_lengths=[9, 3],
                   prefill_ids=[1, 2, 3], prefill_slots=[2], prefill_starts=[0],
                   prefill_lengths=[3], prefill_keep=[2])
    assert StepRecord.decode(r.encode()) == r and not r.empty and StepRecord().empty
    with pytest.raises(ValueError, match="field lengths"):
        StepRecord.decode(r.encode()[:-1])


@pytest.mark.parametrize("argv, message", [
    (["serve", "--preset", "debug", "--tensor-parallel", "3", "--device", "cpu"],
     "--tensor-parallel: tensor parallel size 3 does not divide num_attention_heads=4"),
    (["serve", "--preset", "debug", "--expert-parallel"],
     "--expert-parallel needs --tensor-parallel"),
    (["serve", "--preset", "debug", "--tensor-parallel", "2", "--device", "cuda:1"],
     "--tensor-parallel: give --device cuda"),
    (["generate", "--checkpoint", ".", "--prompt", "x", "--tensor-parallel", "0"],
     "--tensor-parallel must be >= 1"),
])
def test_tensor_parallel_flags_fail_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_benchmark_smoke_on_one_gpu(tmp_path):
    """One GPU: one-rank NCCL collectives captured in the decode CUDA graphs, greedy check."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(BENCH), "--tiny", "--device", "cuda", "--json",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(out.read_text())["ok"]
