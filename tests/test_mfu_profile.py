"""benchmarks/profile_scopes.py: the kernel kinds, the (pass, scope) of an op from its ancestors,
and a real CPU profile of a tiny model attributed to the model's parts."""

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location("profile_scopes", BENCH / "profile_scopes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["profile_scopes"] = mod
    spec.loader.exec_module(mod)
    return mod


ps = _load()


def test_kernel_kinds_of_cuda_and_cpu_names():
    cases = {
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
        "at::detail::Array<char*, 3> >(int, at::native::CUDAFunctor_add<float>, "
        "at::detail::Array<char*, 3>)": "elementwise",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda("
        "at::TensorIteratorBase&)::{lambda()#3}::operator()() const>": "copy/cast",
        "scan_kernel": "lightning-triton",
        "dkdv_kernel": "lightning-triton",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "attention-kernel",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>":
            "optimizer",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps>>": "reduce",
        "void at::native::index_elementwise_kernel<128, 4, gpu_index_kernel>": "index/sort",
        "triton_poi_fused_add_mul_rsqrt_0": "inductor-fused",
        "aten::mm": "matmul", "aten::silu": "elementwise", "aten::view": "view/alloc",
        "aten::_to_copy": "copy/cast", "aten::scatter_add_": "index/sort",
        "aten::fill_": "fill", "something_new": "other",
    }
    for name, kind in cases.items():
        assert ps.kernel_kind(name) == kind, name


def test_short_name_drops_template_noise():
    name = ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>,"
            " at::detail::Array<char*, 3> >(int)")
    assert ps.short_name(name) == "vectorized_elementwise_kernel<CUDAFunctor_add<float>>"
    assert len(ps.short_name("x" * 300, 50)) == 50


def test_pass_and_scope_from_the_ancestors():
    fb = ("forward+backward", -1)
    # forward: the innermost label wins
    assert ps.classify([("aten::mul", 3), ("scope:norms", -1), ("scope:layer-residual", -1),
                        fb], {}) == ("fwd", "norms")
    assert ps.classify([("aten::mul", 3), fb], {}) == ("fwd", "unscoped")
    # backward: the scope of the forward op that created the node (by sequence number)
    eng = ("autograd::engine::evaluate_function: MmBackward0", 7)
    assert ps.classify([("aten::mm", -1), eng, fb], {7: "moe-experts"}) == ("bwd", "moe-experts")
    assert ps.classify([("aten::mm", -1), eng, fb], {}) == ("bwd", "unscoped")
    # a labelled forward inside a backward node: activation checkpointing's recompute
    ck = ("autograd::engine::evaluate_function: CheckpointFunctionBackward", 9)
    assert ps.classify([("aten::mm", 4), ("scope:attention-proj", -1),
                        ("scope:attention-lightning", -1), ck, fb], {9: "layer-residual"}) == \
        ("recompute", "attention-proj")
    # the Step's own regions
    assert ps.classify([("aten::_foreach_mul_", -1), ("optimizer", -1)], {}) == \
        ("step", "optimizer")
    assert ps.classify([("aten::mul_", -1), ("clip", -1)], {}) == ("step", "clip")


def test_tiny_model_profile_attributes_every_part_and_restores_the_model():
    from torch.profiler import ProfilerActivity, profile

    from minimax01 import MiniMaxForCausalLM, ModelConfig
    from minimax01.config import FULL, LINEAR
    from minimax01.ops import moe

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, rotary_dim=8, num_local_experts=4,
                      num_experts_per_tok=2, block_size=16, vocab_size=64, num_hidden_layers=2,
                      layer_types=[LINEAR, FULL])
    model = MiniMaxForCausalLM(cfg).train()
    ids = torch.randint(0, 64, (1, 64))
    plan = moe.plan
    with ps.label_model(model):
        assert moe.plan is not plan
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.profiler.record_function("forward+backward"):
                out = model(ids, labels=ids)
                out.loss.backward()
    assert moe.plan is plan
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    rows, total = ps.attribute(prof, cuda=False)
    assert abs(sum(r.us for r in rows) - total) < 1e-6 * total
    s = ps.summarise(rows, total)
    want = ["embedding", "norms", "attention-proj", "attention-lightning", "attention-softmax",
            "moe-router", "moe-permute", "moe-experts", "moe-combine", "lm_head+loss"]
    for scope in want:
        assert f"fwd {scope}" in s["buckets"], scope
    for scope in ["norms", "attention-proj", "attention-lightning", "moe-experts",
                  "moe-combine", "moe-router", "lm_head+loss"]:
        assert f"bwd {scope}" in s["buckets"], scope
    # the expert matmuls and the lightning chunk matmuls land in their scopes
    mm = {(r.passname, r.scope) for r in rows if r.kind == "matmul"}
    assert ("fwd", "moe-experts") in mm and ("bwd", "moe-experts") in mm
    unscoped = sum(b["ms"] for k, b in s["buckets"].items() if k.endswith("unscoped"))
    assert unscoped < 0.25 * s["total_ms"]
    assert len(s["top"]) == 15 and all(t["bucket"] for t in s["top"])
