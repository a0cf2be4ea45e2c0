"""Compile the Triton lightning kernels for sm_90 on a machine without a GPU and print what each
variant needs: shared memory, whether the block loop's loads are pipelined (cp.async or TMA
copies in the TTGIR), registers and spill bytes (Triton's bundled ptxas -v).

    python benchmarks/lightning_sm90_compile.py [KERNEL_DIR] [basic | JSON list of cases]

    e.g. '[{"kind": "scan", "bt": 64, "bv": 32, "nw": 4, "ns": 3, "tma": 0},
           {"kind": "dkdv", "bt": 64, "nw": 8, "ns": 2, "tma": 1}]'

Works in an environment with only `triton` installed (torch is stubbed: the kernel files import
it for their host code), e.g. a venv with triton==3.6.0 to match a GPU machine's version; this is
how the sweep's candidates were pruned (docs/kernels.md). Pointers and strides are given the
16-divisibility Triton's launcher finds at run time (without it nothing is pipelined)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

try:
    import torch  # noqa: F401
except ImportError:
    torch = types.ModuleType("torch")
    torch.device = torch.Tensor = torch.dtype = object
    torch.float16 = torch.bfloat16 = torch.float32 = None
    sys.modules["torch"] = torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from triton.runtime.jit import JITFunction
ROOT = (sys.argv[1] if len(sys.argv) > 1 else
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "minimax01", "ops",
                     "lightning"))
pkg = types.ModuleType("lk")
pkg.__path__ = [ROOT]
sys.modules["lk"] = pkg


def load(name, path=None):
    """A kernel file as module lk.NAME (its relative imports resolve inside lk)."""
    spec = importlib.util.spec_from_file_location(f"lk.{name}",
                                                  path or os.path.join(ROOT, name + ".py"))
    m = importlib.util.module_from_spec(spec)
    sys.modules[f"lk.{name}"] = m
    spec.loader.exec_module(m)
    return m


# the lightning triton_jit re-exports ops/triton_jit.py (one level up): load that one in its place
load("triton_jit", os.path.join(ROOT, "..", "triton_jit.py"))
load("triton_items")
scan = load("triton_scan").scan_kernel.fn
dkdv = load("triton_dkdv").dkdv_kernel.fn
comb = load("triton_combine").combine_kernel.fn
items = load("triton_items").items_kernel.fn
dec = load("triton_decode").decode_kernel.fn
target = GPUTarget("cuda", 90, 32)

def sig_for(fn, types_, consts):
    jf = JITFunction(fn)
    sig = {}
    for name in jf.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = types_.get(name, "i32")
    return jf, sig

def compile_one(fn, types_, consts, num_warps, num_stages, label):
    jf, sig = sig_for(fn, types_, consts)
    div = ("stride", "_r", "_h", "sin_k", "sout_k", "ss_", "sq_", "sk_", "sv_", "so_")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(jf.arg_names)
             if n not in consts and (sig[n].startswith("*") or any(x in n for x in div))}
    src = ASTSource(jf, sig, consts, attrs)
    t = time.time()
    try:
        k = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
        md = k.metadata
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", out); spill = re.search(r"(\d+) bytes spill stores", out)
        k.n_regs = int(regs.group(1)) if regs else None; k.n_spills = int(spill.group(1)) if spill else None
        g = k.asm["ttgir"]
        print(f"ok   {label:<70} shared={md.shared:>6} async={g.count('async_copy_global_to_local')} tma={g.count('async_tma_copy_global_to_local')} regs={getattr(k,'n_regs',None)} spills={getattr(k,'n_spills',None)} {time.time()-t:.1f}s", flush=True)
        return k
    except Exception as e:
        msg = str(e).strip().splitlines()
        print(f"FAIL {label}: {type(e).__name__}: {' | '.join(msg[-6:])[:600]}", flush=True)
        return None

def scan_case(bt, bv, nw, ns, tma, reverse=0, state_only=0, mode=0, has_sin=1, store=1, dt="bf16", dk=128, dv=128, order=0, by_item=0):
    bk = max(16, 1 << (dk - 1).bit_length())
    P = f"*{dt}"
    types_ = dict(A=P, B=P, V=P, O=P, S_IN="*fp32", S_OUT="*fp32", CU="*i32", ITEMS="*i32", ORDER="*i32", SLOPE="*fp32",
                  H="i32", seq_len="i32", n_tok="i32", stride_ab_t="i32", stride_vo_t="i32")
    for n in ("sin_r","sin_h","sin_k","sin_v","sout_r","sout_h","sout_k","sout_v"):
        types_[n] = "i32"
    if tma:
        types_["A"] = f"tensordesc<{dt}[{bt}, {bk}]>"; types_["B"] = f"tensordesc<{dt}[{bt}, {bk}]>"
        types_["V"] = f"tensordesc<{dt}[{bt}, {bv}]>"
    consts = dict(DK=dk, DV=dv, BLOCK_T=bt, BLOCK_K=bk, BLOCK_V=bv, MODE=mode, HAS_ORDER=bool(order), REVERSE=reverse,
                  STATE_ONLY=bool(state_only), HAS_S_IN=bool(has_sin), SIN_BY_ITEM=bool(by_item), STORE_S=bool(store), USE_TMA=bool(tma), PREC=("ieee" if dt == "fp32" else None))
    return compile_one(scan, types_, consts, nw, ns, f"scan bt{bt} bv{bv} w{nw} s{ns} tma{int(tma)} rev{reverse} so{state_only} mode{mode} {dt} d{dk}/{dv} ord{order}")

def dkdv_case(bt, nw, ns, tma, mode=0, dt="bf16", d=128):
    P = f"*{dt}"
    types_ = dict(Q=P, K=P, V=P, DO=P, DQK=P, DVO=P, S_IN="*fp32", S_OUT="*fp32", CU="*i32", ITEMS="*i32", ORDER="*i32", SLOPE="*fp32")
    if tma:
        for n in ("Q","K","V","DO"):
            types_[n] = f"tensordesc<{dt}[{bt}, {d}]>"
    consts = dict(DK=d, DV=d, BLOCK_T=bt, BLOCK_K=d, BLOCK_V=d, MODE=mode, HAS_ORDER=False, HAS_S_IN=True, SIN_BY_ITEM=True, STORE_S=True, USE_TMA=bool(tma), PREC=("ieee" if dt == "fp32" else None))
    return compile_one(dkdv, types_, consts, nw, ns, f"dkdv bt{bt} w{nw} s{ns} tma{int(tma)} mode{mode} {dt}")

if __name__ == "__main__":
    which = sys.argv[2] if len(sys.argv) > 2 else "basic"
    if which == "basic":
        scan_case(64, 32, 4, 3, False)
        scan_case(64, 32, 4, 3, False, reverse=1)
        scan_case(64, 32, 4, 3, False, state_only=1, mode=2)
        scan_case(64, 32, 4, 3, True)
        scan_case(64, 32, 4, 3, True, reverse=1, mode=1)
        scan_case(64, 32, 4, 3, False, dt="fp32")
        dkdv_case(64, 8, 2, False)
        dkdv_case(64, 8, 2, True)
        compile_one(comb, dict(BUF="*fp32", S0="*fp32", ITEMS="*i32", DOC_FIRST="*i32", SLOPE="*fp32"), dict(BLOCK_K=64, BLOCK_V=64, REVERSE=1, HAS_S0=True), 4, 1, "combine")
        compile_one(items, dict(CU="*i32", ITEMS="*i32", DOC_FIRST="*i32"), dict(BLOCK=256), 4, 1, "items")
        compile_one(dec, dict(Q="*bf16", K="*bf16", V="*bf16", S="*fp32", O="*bf16", SLOPE="*fp32", SLOT="*i64"), dict(DK=128, DV=128, BLOCK_K=128, BLOCK_V=128, HAS_SLOT=True, EVEN=True, EVICT=True), 8, 1, "decode")
    else:
        for spec in json.loads(which):
            kind = spec.pop("kind")
            (scan_case if kind == "scan" else dkdv_case)(**spec)
