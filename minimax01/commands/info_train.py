"""`info --train`: memory per GPU of a full fine-tuning or LoRA run (train/memory.py) on
`--gpus N` GPUs of `--gpu-memory` GiB (default an H200's 140), and the fewest GPUs that fit.

Layout and run options come from flags, or from a training config (`--config FILE.toml`: its
[parallel] degrees, train.lora, train.seq_len, train.loss_chunk_size and
train.activation_checkpointing), flags winning. Exit status 1 when the run does not fit."""

from __future__ import annotations

import json

from ..accounting import Table, fmt_bytes, fmt_count
from ..cli import CLIError
from ..config import ModelConfig


def add_train_arguments(parser) -> None:
    g = parser.add_argument_group("training memory (--train)")
    g.add_argument("--train", action="store_true",
                   help="plan memory per GPU for training / fine-tuning instead of serving")
    g.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R", help="LoRA rank (16)")
    g.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated LoRA targets (default the attention projections)")
    for name, what in (("ep", "expert parallel"), ("etp", "expert tensor parallel"),
                       ("cp", "context parallel"), ("dp_replicate", "HSDP replicas")):
        g.add_argument(f"--parallel.{name}", dest=f"parallel_{name}", type=int, default=None,
                       metavar="N", help=f"{what} degree (1)")
    g.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="tokens per data-parallel rank per micro-batch (8192)")
    g.add_argument("--recompute", default=None, choices=["full", "none"],
                   help="activation checkpointing of every decoder layer (full) or none")
    g.add_argument("--loss-chunk", type=int, default=None, metavar="N",
                   help="train.loss_chunk_size (0: the whole micro-batch's logits at once)")
    g.add_argument("--param-dtype", default="none", choices=["none", "bfloat16", "float32"],
                   help="parallel.param_dtype (FSDP's gathered weights)")
    g.add_argument("--overhead", type=float, default=None, metavar="GiB",
                   help="CUDA context, NCCL buffers, fragmentation (4)")


def _options(args, run_cfg) -> dict:
    from ..train.config import LORA_TARGETS
    from ..train.memory import OVERHEAD_GIB, GiB

    lora_cfg = run_cfg.train.lora if run_cfg is not None else None
    par = run_cfg.parallel if run_cfg is not None else None

    def pick(flag, from_cfg, default):
        return flag if flag is not None else from_cfg if from_cfg is not None else default

    lora = args.lora or bool(lora_cfg and lora_cfg.rank)
    rank = pick(args.lora_rank, lora_cfg.rank if lora_cfg and lora_cfg.rank else None, 16)
    targets = (args.lora_targets.split(",") if args.lora_targets
               else lora_cfg.targets if lora_cfg else list(LORA_TARGETS[:-1]))
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise CLIError(f"--lora-targets: unknown target {bad[0]!r}; choose among "
                       f"{', '.join(LORA_TARGETS)}")
    t = run_cfg.train if run_cfg is not None else None
    opts = dict(
        lora_rank=rank if lora else 0, lora_targets=targets,
        ep=pick(args.parallel_ep, par.ep if par else None, 1),
        etp=pick(args.parallel_etp, getattr(par, "etp", None) if par else None, 1),
        cp=pick(args.parallel_cp, par.cp if par else None, 1),
        dp_replicate=pick(args.parallel_dp_replicate, par.dp_replicate if par else None, 1),
        tokens=pick(args.tokens, t.seq_len if t else None, 8192),
        recompute=pick(args.recompute, ("full" if t.activation_checkpointing else "none")
                       if t else None, "full"),
        loss_chunk=pick(args.loss_chunk, t.loss_chunk_size if t else None, 0),
        param_dtype=args.param_dtype if args.param_dtype != "none" or par is None
        else par.param_dtype,
        overhead=pick(args.overhead, None, OVERHEAD_GIB) * GiB)
    for name in ("lora_rank", "ep", "etp", "cp", "dp_replicate", "tokens"):
        if opts[name] < (0 if name == "lora_rank" else 1):
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {opts[name]}")
    if opts["loss_chunk"] < 0 or opts["overhead"] < 0:
        raise CLIError("--loss-chunk and --overhead must be >= 0")
    return opts


def _table(plan, gpu_gib: float) -> Table:
    from ..train.memory import GiB

    names = {"weights": "weights", "gradients": "gradients", "optimizer": "AdamW moments",
             "gathered": "FSDP gathered layers", "activations": "activations",
             "loss": "logits / loss", "overhead": "overhead"}
    rows = [[names[k], fmt_bytes(v)] for k, v in plan.parts.items()]
    rows.append(["total", fmt_bytes(plan.total)])
    mode = "LoRA" if plan.mode == "lora" else "full fine-tuning"
    layout = (f"ep {plan.ep}, etp {plan.etp}, cp {plan.cp}, dp_replicate {plan.dp_replicate}, "
              f"FSDP over the rest")
    notes = [f"{fmt_count(plan.trainable)} trainable of {fmt_count(plan.params)} parameters; "
             f"{plan.tokens_per_gpu} tokens per data-parallel rank, recompute {plan.recompute}",
             f"{'fits' if plan.fits else 'does NOT fit'} in {gpu_gib:g} GiB per GPU"]
    return Table(f"Training memory per GPU: {mode} on {plan.gpus} GPU(s) ({layout})",
                 ["part", "per GPU"], rows, notes)


def run_train(args, cfg: ModelConfig, lines: list[str], run_cfg=None) -> int:
    from ..train.memory import GiB, H200_GIB, count_parameters, min_gpus, plan_training

    gpu_gib = args.gpu_memory if args.gpu_memory is not None else H200_GIB
    if gpu_gib <= 0:
        raise CLIError(f"--gpu-memory must be positive, got {gpu_gib}")
    if args.gpus is not None and args.gpus <= 0:
        raise CLIError(f"--gpus must be positive, got {args.gpus}")
    opts = _options(args, run_cfg)
    try:
        counts = count_parameters(cfg, opts["lora_rank"], opts["lora_targets"])
        plan = (plan_training(cfg, args.gpus, counts=counts, gpu_memory=gpu_gib * GiB, **opts)
                if args.gpus is not None else None)
        fewest = min_gpus(cfg, counts=counts, gpu_memory=gpu_gib * GiB, **opts)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps({"plan": plan.to_json() if plan else None,
                          "min_gpus": fewest.gpus if fewest else None,
                          "min_plan": fewest.to_json() if fewest else None,
                          "gpu_memory_gib": gpu_gib}, indent=2))
    else:
        out = list(lines)
        if plan is not None:
            out += [_table(plan, gpu_gib).render(), ""]
        if fewest is None:
            out.append(f"no layout up to 4096 GPUs fits in {gpu_gib:g} GiB per GPU")
        else:
            out.append(f"fewest GPUs of {gpu_gib:g} GiB for this layout: {fewest.gpus} "
                       f"({fmt_bytes(fewest.total)} per GPU)")
            if plan is None:
                out += ["", _table(fewest, gpu_gib).render()]
        print("\n".join(out).rstrip())
    return 0 if (plan.fits if plan is not None else fewest is not None) else 1
