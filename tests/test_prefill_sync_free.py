"""The serving prefill forward never waits for the GPU (issue 18: a mixed step's fixed cost).

A GPU is not needed to prove it: the model and the slot pool live on the `meta` device, where
tensors have shapes and no values, so any read of a device value on the host (`.item()`,
`bool(t)`, `int(t)`, `.tolist()`, a shape that depends on values: nonzero, masked_select,
unique, repeat_interleave without output_size) either raises or is counted below. Triton
launches are the one thing stubbed (their launch wrappers, plans included, run for real): a
kernel launch never reads back. The step runs the CUDA configuration (bf16), with and without the fused norms: Triton lightning and slot
attention kernels, the serving MoE pipeline with the grouped matmul.

Counted, per prefill step (`begin_prefill` + the forward), on the second of two identical steps
(the first checks each layer's decay slopes once per tensor, lightning/checks.py, then never):
  * reads of device values: 0;
  * host->device copies: exactly 1, the step's packed index buffer (infer/h2d.py)."""

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minimax01.ops.triton_jit as triton_jit
from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.infer.fused_prefill import fused_prefill
from minimax01.infer.prepare import cast_model, prepare_for_serving
from minimax01.infer.slot_cache import SlotCache, SlotPool

pytest.importorskip("triton")

aten = torch.ops.aten
COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default}
SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                  aten.unique_consecutive.default, aten.unique_dim.default,
                  aten.bincount.default}


class HostTraffic(TorchDispatchMode):
    """Counts device->host reads and host->device copies of `device` tensors."""

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device, self.reads, self.h2d = device, [], 0
        self._saved = {}

    def __enter__(self):
        # torch.tensor(data, device=...) copies inside the factory, out of the dispatcher's sight
        for name in ("tensor", "as_tensor"):
            self._saved[name] = made = getattr(torch, name)
            setattr(torch, name, self._factory(made))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch, name, fn)
        return super().__exit__(*exc)

    def _factory(self, made):
        def factory(data, *args, **kwargs):
            out = made(data, *args, **kwargs)
            if out.device.type == self.device and not isinstance(data, torch.Tensor):
                self.h2d += 1
            return out
        return factory

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SCALAR_READS:  # item(), bool(), int(), float(): a value, made up
            self.reads.append(func.__name__)
            return True if func is aten.is_nonzero.default or args[0].dtype == torch.bool else 1
        if func in DATA_DEPENDENT or (func is aten.repeat_interleave.Tensor
                                      and kwargs.get("output_size") is None):
            self.reads.append(func.__name__)
        out = func(*args, **kwargs)
        if func in COPIES or func.overloadpacket is aten.to:  # (inference mode: aten.to)
            src = args[1] if func is aten.copy_.default else args[0]
            dst = out
            if src.device.type == "cpu" and dst.device.type == self.device:
                self.h2d += 1
            elif src.device.type == self.device and dst.device.type == "cpu":
                self.reads.append("device->host copy")
        return out


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def stub_meta_launches(monkeypatch):
    at = triton_jit.DualKernel.at

    def meta_at(self, device):
        return _NoLaunch() if torch.device(device).type == "meta" else at(self, device)

    monkeypatch.setattr(triton_jit.DualKernel, "at", meta_at)


def served_on_meta(wrap_prefill=None):
    cfg = ModelConfig.from_preset("debug")
    model = MiniMaxForCausalLM.from_config_on_meta(cfg)
    cast_model(model, dtype=torch.bfloat16)  # what _grouped_mm takes
    prepare_for_serving(model, sync_free=True)
    for layer in model.model.layers:  # the GPU's grouped matmul, not the CPU's dense one
        layer.mlp.pipeline = replace(layer.mlp.pipeline, matmul="grouped")
    pool = SlotPool(cfg, 3, 256, device="meta", dtype=torch.bfloat16)
    return model, SlotCache(pool, attention="triton", lightning="triton",
                            wrap_prefill=wrap_prefill)


def prefill(model, cache):
    step = cache.begin_prefill([0, 2], [0, 16], [20, 12], tokens=list(range(32)), keep=[19, 31])
    return model(step.input_ids, cu_seqlens=step.cu_seqlens, cache=step,
                 logits_to_keep=step.keep).logits


@pytest.mark.parametrize("wrap", [None, fused_prefill], ids=["plain", "fused-norms"])
@torch.inference_mode()
def test_prefill_step_reads_nothing_back_and_copies_once(stub_meta_launches, wrap):
    model, cache = served_on_meta(wrap)
    assert {type(layer.self_attn).__name__ for layer in model.model.layers} == {
        "LightningAttention", "SoftmaxAttention"}
    with HostTraffic() as first:
        prefill(model, cache)
    assert first.h2d == 1
    with HostTraffic() as second:
        logits = prefill(model, cache)
    assert logits.shape == (1, 2, model.config.vocab_size)
    assert second.reads == [], second.reads
    assert second.h2d == 1


@torch.inference_mode()
def test_the_counter_sees_reads_and_copies():
    x = torch.ones(4, device="meta")
    with HostTraffic() as t:
        bool(x.sum() > 0)
        x.new_ones(3).to(torch.int64)
        torch.tensor([1, 2, 3]).to("meta")
        torch.tensor([1, 2, 3], device="meta")
        torch.repeat_interleave(torch.ones(2, dtype=torch.long, device="meta"), 2,
                                output_size=4)
    assert len(t.reads) == 1
    assert t.h2d == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("wrap", [None, fused_prefill], ids=["plain", "fused-norms"])
@torch.inference_mode()
def test_cuda_prefill_step_never_syncs(wrap):
    # the same on a GPU: CUDA's sync debug mode raises at any stream synchronisation
    cfg = ModelConfig.from_preset("debug")
    torch.manual_seed(0)
    model = cast_model(MiniMaxForCausalLM(cfg), "cuda", torch.bfloat16)
    restore = prepare_for_serving(model, sync_free=True)
    pool = SlotPool(cfg, 3, 256, device="cuda", dtype=torch.bfloat16)
    cache = SlotCache(pool, wrap_prefill=wrap)
    ref = prefill(model, cache)  # warm: compiles the kernels, checks the slopes once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = prefill(model, cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        restore()
    assert torch.isfinite(logits).all() and logits.shape == ref.shape
