"""Where a train step's device time goes, by the model part that launched each kernel (issue 16).

Kernel-name heuristics alone put 70% of the `1b` step in "other elementwise": a `mul<float>`
kernel says nothing about whether it is an RMSNorm, the lightning gate or the MoE combine.
Here every kernel (CPU: every leaf op) is attributed to

  * a *scope*: the innermost `record_function` label around the op that launched it. The labels
    come from outside the model (`label_model`): forward pre/post hooks on its sub-modules, and
    wrappers around the MoE pipeline's functions (route, plan, combine, aux loss) and the loss;
  * a *pass*: "fwd", "bwd" (the op runs inside an autograd engine node; its scope is the scope of
    the forward op that created the node, matched by sequence number) or "recompute" (a labelled
    forward inside a backward node: activation checkpointing);
  * a *kind* from the kernel name (matmul, lightning-triton, elementwise, copy/cast, ...).

`attribute(prof)` returns rows (pass, scope, kind, kernel name, microseconds, count);
`summarise` folds them into buckets. The model code is never edited."""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.profiler import record_function

# ------------------------------------------------------------------------------ kinds
KINDS = [  # first match wins; names lower-cased (CUDA kernel names or CPU aten op names)
    ("lightning-triton", r"scan_kernel|combine_kernel|dkdv_kernel|items_kernel"),
    ("inductor-fused", r"^triton_(poi|red|per|tem)_|compiledfxgraph|compiled_fx_graph"),
    ("optimizer", r"adam|multi_tensor_apply|foreach"),
    ("attention-kernel", r"flash|fmha|cudnn|sdpa|scaled_dot_product|attention"),
    ("matmul", r"gemm|cutlass|cublas|nvjet|xmma|wgmma|grouped_mm|sm90_|sm100_|aten::(mm|bmm|addmm"
               r"|matmul|linear|baddbmm|_grouped_mm)$"),
    ("copy/cast", r"copy|convert|to_copy|cast|aten::to$|aten::_to_copy|clone|contiguous"),
    ("index/sort", r"index|gather|scatter|sort|topk|cumsum|bincount|nonzero|masked|embedding"
                   r"|searchsorted|repeat_interleave|arange"),
    ("reduce", r"reduce|sum|mean|logsumexp|softmax|norm|max|min"),
    ("fill", r"fill|zero|memset"),
    ("view/alloc", r"aten::(view|as_strided|_unsafe_view|reshape|expand|t|transpose|split|"
                   r"split_with_sizes|slice|select|unsqueeze|squeeze|permute|chunk|detach|alias|"
                   r"empty|empty_strided|empty_like|unbind|narrow|resolve_conj|resolve_neg)$"),
    ("elementwise", r"elementwise|vectorized|unrolled|aten::(mul|add|sub|div|silu|sigmoid|exp|"
                    r"rsqrt|pow|neg|where|clamp|lt|ge|eq|ne|silu_backward|sigmoid_backward|"
                    r"threshold|sqrt|reciprocal|abs)"),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pat in KINDS if re.search(pat, low)), "other")


def short_name(name: str, width: int = 100) -> str:
    """A kernel name without the template noise that hides what it does: `void
    at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>` ->
    `vectorized_elementwise_kernel<CUDAFunctor_add<float>>`."""
    s = re.sub(r"^void\s+", "", name)
    s = re.sub(r"\bat::native::(\(anonymous namespace\)::)?", "", s)
    m = re.match(r"([\w:]+)<\d+,\s*([\w:]+(?:<[\w:, ]*>)?)", s)
    if m:
        s = f"{m.group(1)}<{m.group(2)}>"
    s = re.sub(r"\(anonymous namespace\)::", "", s)
    return s if len(s) <= width else s[: width - 3] + "..."


# ------------------------------------------------------------------------------ labels
LABEL = "scope:"  # prefix of our record_function names
BUCKETS = ("embedding", "norms", "attention-proj", "attention-lightning", "attention-softmax",
           "layer-residual", "moe-router", "moe-permute", "moe-experts", "moe-combine",
           "moe-other", "layer-compiled", "lm_head+loss", "model-other", "clip", "optimizer",
           "unscoped")


def module_scopes(model) -> list[tuple[torch.nn.Module, str]]:
    """(module, scope) for every labelled sub-module of a MiniMaxForCausalLM. Nested labels:
    the innermost wins (the projections inside an attention module are `attention-proj`)."""
    out = [(model, "model-other"), (model.model.embed_tokens, "embedding"),
           (model.model.norm, "norms"), (model.lm_head, "lm_head+loss")]
    for layer in model.model.layers:
        attn = layer.self_attn
        lightning = hasattr(attn, "qkv_proj")
        out.append((layer, "layer-residual"))
        out.append((attn, "attention-lightning" if lightning else "attention-softmax"))
        for name, sub in attn.named_children():
            if isinstance(sub, torch.nn.Linear):
                out.append((sub, "attention-proj"))
        if lightning:
            out.append((attn.norm, "norms"))
        out += [(layer.input_layernorm, "norms"), (layer.post_attention_layernorm, "norms"),
                (layer.mlp, "moe-other"), (layer.mlp.gate, "moe-router"),
                (layer.mlp.experts, "moe-experts")]
    return out


def _wrap(fn, scope):
    def wrapped(*a, **kw):
        with record_function(LABEL + scope):
            return fn(*a, **kw)
    wrapped.__wrapped__ = fn
    return wrapped


@contextlib.contextmanager
def label_model(model, inside_layers: bool = True):
    """Inside: the model's parts run under `scope:<bucket>` record_function labels. Hooks and
    function wrappers are removed on exit. `inside_layers=False` (compiled decoder layers: a
    hook inside a compiled graph would break it) labels each whole layer `layer-compiled` and
    leaves its kernels to the kind heuristics (Inductor's fused kernels have no module)."""
    from minimax01.model import layers as layers_mod
    from minimax01.model import model as model_mod
    from minimax01.ops import loss as loss_mod
    from minimax01.ops import moe as moe_mod

    handles, stack = [], []

    def pre(scope):
        def hook(module, args):
            rf = record_function(LABEL + scope)
            rf.__enter__()
            stack.append(rf)
        return hook

    def post(module, args, out):
        stack.pop().__exit__(None, None, None)

    scopes = module_scopes(model)
    if not inside_layers:
        inner = {id(m) for layer in model.model.layers for m in layer.modules()}
        scopes = [(m, s) for m, s in scopes if id(m) not in inner]
        scopes += [(layer, "layer-compiled") for layer in model.model.layers]
    for module, scope in scopes:
        hook_pre, hook_post = pre(scope), post
        if not inside_layers and scope == "layer-compiled":  # run outside Dynamo's graph
            hook_pre = torch._dynamo.disable(hook_pre)
            hook_post = torch._dynamo.disable(hook_post)
        handles.append(module.register_forward_pre_hook(hook_pre))
        handles.append(module.register_forward_hook(hook_post, always_call=True))
    patches = [(loss_mod, "chunked_cross_entropy", "lm_head+loss"),
               (loss_mod, "chunked_token_logprobs", "lm_head+loss")]
    if inside_layers:
        patches += [(layers_mod, "route", "moe-router"), (moe_mod, "plan", "moe-permute"),
                    (moe_mod, "combine", "moe-combine"),
                    (moe_mod, "load_balancing_loss", "moe-other")]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    lm_loss = model_mod.MiniMaxForCausalLM.__dict__["lm_loss"]
    try:
        for mod, name, scope in patches:
            setattr(mod, name, _wrap(getattr(mod, name), scope))
        model_mod.MiniMaxForCausalLM.lm_loss = staticmethod(_wrap(lm_loss.__func__,
                                                                   "lm_head+loss"))
        yield
    finally:
        for h in handles:
            h.remove()
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        model_mod.MiniMaxForCausalLM.lm_loss = lm_loss


# ------------------------------------------------------------------------------ attribution
ENGINE = "autograd::engine::evaluate_function"
REGIONS = {"clip": "clip", "optimizer": "optimizer"}  # the Step's own top-level labels


@dataclass
class Row:
    passname: str   # fwd | bwd | recompute | step
    scope: str      # a BUCKETS entry
    kind: str       # a KINDS entry
    name: str       # kernel (CUDA) or op (CPU) name
    us: float
    count: int


def _label_of(name: str) -> str | None:
    if name.startswith(LABEL):
        return name[len(LABEL):]
    return REGIONS.get(name)


def classify(chain: list[tuple[str, int]], seq_scope: dict[int, str]) -> tuple[str, str]:
    """(pass, scope) of an op from its ancestors `chain` [(name, sequence_nr)], innermost first
    (the op itself included). `seq_scope` maps a forward op's sequence number to its scope."""
    label, engine_seq = None, None
    for name, seq in chain:
        if label is None:
            label = _label_of(name)
            if label is not None and engine_seq is None and name in REGIONS:
                return "step", label
        if name.startswith(ENGINE) and engine_seq is None:
            engine_seq = seq
            if label is not None:  # a labelled forward run by a backward node: recompute
                return "recompute", label
    if engine_seq is not None:
        return "bwd", seq_scope.get(engine_seq, "unscoped")
    return "fwd", label or "unscoped"


def _events(prof):
    return [e for e in prof.events() if str(e.device_type) == "DeviceType.CPU"]


def attribute(prof, cuda: bool) -> tuple[list[Row], float]:
    """Rows per (pass, scope, kind, name) and the total device time (CUDA: every kernel the
    profiler saw, attributed or not; CPU: the ops' self time)."""
    events = _events(prof)

    def chain(e):
        out = []
        while e is not None:
            out.append((e.name, getattr(e, "sequence_nr", -1)))
            e = e.cpu_parent
        return out

    # forward ops' sequence numbers -> their scope (the first labelled op with that number)
    seq_scope: dict[int, str] = {}
    for e in events:
        seq = getattr(e, "sequence_nr", -1)
        if seq is None or seq < 0 or e.name.startswith(ENGINE) or seq in seq_scope:
            continue
        p, s = classify(chain(e), {})
        if p == "fwd":
            seq_scope[seq] = s
    acc: dict[tuple, list] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if cuda:
            items = [(k.name, k.duration) for k in getattr(e, "kernels", [])]
        else:
            if _label_of(e.name) or e.name.startswith(ENGINE):
                continue  # CPU: every op's self time (its own work, its children excluded)
            if e.name.startswith("ProfilerStep") or e.name == "forward+backward":
                continue
            items = [(e.name, e.self_cpu_time_total)]
        if not items:
            continue
        p, s = classify(chain(e), seq_scope)
        for name, us in items:
            if us <= 0:
                continue
            a = acc[(p, s, kernel_kind(name), name)]
            a[0] += us
            a[1] += 1
    rows = [Row(p, s, k, n, us, c) for (p, s, k, n), (us, c) in acc.items()]
    total = sum(r.us for r in rows)
    if cuda:  # every device kernel, attributed or not (a kernel with no launching op is lost)
        seen = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages()
                   if str(getattr(e, "device_type", "")) == "DeviceType.CUDA")
        if seen > total:
            rows.append(Row("?", "unscoped", "unattributed", "(kernels with no launching op)",
                            seen - total, 0))
            total = seen
    return rows, total


def summarise(rows: list[Row], total_us: float, steps: int = 1) -> dict:
    """Buckets "pass scope" -> ms per step, share, kernel count and ms per kind; the top 15
    kernels (by name, with their main bucket)."""
    buckets: dict[str, dict] = {}
    for r in rows:
        b = buckets.setdefault(f"{r.passname} {r.scope}",
                               {"ms": 0.0, "count": 0, "kinds": defaultdict(float)})
        b["ms"] += r.us / 1e3 / steps
        b["count"] += r.count // max(steps, 1) if r.count else 0
        b["kinds"][r.kind] += r.us / 1e3 / steps
    for b in buckets.values():
        b["share"] = b["ms"] * 1e3 * steps / max(total_us, 1e-9)
        b["kinds"] = dict(sorted(b["kinds"].items(), key=lambda kv: -kv[1]))
    by_name: dict[str, dict] = {}
    for r in rows:
        n = by_name.setdefault(r.name, {"us": 0.0, "count": 0, "where": defaultdict(float),
                                        "kind": r.kind})
        n["us"] += r.us
        n["count"] += r.count
        n["where"][f"{r.passname} {r.scope}"] += r.us
    top = sorted(by_name.items(), key=lambda kv: -kv[1]["us"])[:15]
    kinds: dict[str, float] = defaultdict(float)
    scopes: dict[str, float] = defaultdict(float)
    for r in rows:
        kinds[r.kind] += r.us / 1e3 / steps
        scopes[r.scope] += r.us / 1e3 / steps
    return {
        "total_ms": total_us / 1e3 / steps,
        "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1]["ms"])),
        "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "scopes": dict(sorted(scopes.items(), key=lambda kv: -kv[1])),
        "top": [dict(name=short_name(k), ms=v["us"] / 1e3 / steps, share=v["us"] / total_us,
                     count=v["count"] // max(steps, 1), kind=v["kind"],
                     bucket=max(v["where"].items(), key=lambda kv: kv[1])[0])
                for k, v in top],
    }


def lightning_rates(rows: list[Row], steps: int, work: dict[str, tuple[float, float]]) -> list:
    """The Triton lightning kernels per (pass, name): ms per step, launches, and rates against
    `work[pass] = (flops, bytes)` of ONE launch's nominal work (see mfu.py `lightning_work`)."""
    out = {}
    for r in rows:
        if r.kind != "lightning-triton":
            continue
        key = (r.passname, r.name)
        o = out.setdefault(key, [0.0, 0])
        o[0] += r.us
        o[1] += r.count
    res = []
    for (p, name), (us, count) in sorted(out.items(), key=lambda kv: -kv[1][0]):
        flops, nbytes = work.get(p, (float("nan"), float("nan")))
        sec = us / 1e6
        res.append(dict(passname=p, name=short_name(name, 60), ms=us / 1e3 / steps,
                        launches=count // max(steps, 1), us_per_launch=us / max(count, 1),
                        tflops=flops * count / sec / 1e12 if sec else float("nan"),
                        gbps=nbytes * count / sec / 1e9 if sec else float("nan")))
    return res


def print_summary(s: dict, log=print, min_share: float = 0.002) -> None:
    log(f"  device time {s['total_ms']:.1f} ms per step")
    log("  by bucket (pass scope: ms/step, share, kernels/step; main kinds):")
    for name, b in s["buckets"].items():
        if b["share"] < min_share:
            continue
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in list(b["kinds"].items())[:4])
        log(f"    {name:28s} {b['ms']:9.2f} ms {100 * b['share']:5.1f}% {b['count']:6d}  [{kinds}]")
    log("  by scope (all passes): " + ", ".join(
        f"{k} {v:.1f}" for k, v in s["scopes"].items()))
    log("  by kind (all scopes):  " + ", ".join(f"{k} {v:.1f}" for k, v in s["kinds"].items()))
    log("  top 15 kernels (ms/step, share, launches/step, kind, main bucket):")
    for t in s["top"]:
        log(f"    {t['ms']:8.2f} ms {100 * t['share']:5.1f}% {t['count']:5d}  {t['kind']:16s} "
            f"{t['bucket']:26s} {t['name']}")
