"""`python -m minimax01 info --preset NAME | --checkpoint DIR | --config FILE.toml`: parameters,
FLOPs per token and a memory table (weights, KV cache and lightning state per sequence) for a model configuration.

`--preset` takes a model preset (minimax01.config.MODEL_PRESETS) or a run preset (what
`train --preset` takes, minimax01.train.presets.RUN_PRESETS), which shows the model it trains."""

from __future__ import annotations

from pathlib import Path

from ..accounting import fmt_bytes, report
from ..cli import CLIError
from ..config import MODEL_PRESETS, ModelConfig
from ..train.presets import RUN_PRESETS


def add_arguments(parser) -> None:
    runs = [n for n in RUN_PRESETS if n not in MODEL_PRESETS]
    parser.add_argument("--preset", metavar="NAME",
                        help=f"a model preset ({', '.join(MODEL_PRESETS)}) or a run preset "
                             f"({', '.join(runs)}: shows the model it trains)")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="a checkpoint folder (reads config.json and the safetensors headers)")
    parser.add_argument("--config", metavar="FILE.toml",
                        help="a training config (the model of its [model] section), e.g. "
                             "configs/ablations/hybrid.toml")
    parser.add_argument("--gpu-memory", type=float, metavar="GiB",
                        help="also show how many sequences `serve` fits on a GPU of this size")
    parser.add_argument("--max-context", default="8192,131072,1048576", metavar="N[,N...]",
                        help="contexts for --gpu-memory (default 8192,131072,1048576)")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="plan serving on N GPUs of --gpu-memory each (tensor parallel)")
    parser.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                        help="tensor-parallel size for --gpus (default: all of them)")
    parser.add_argument("--quantization", default=None, choices=["int8", "fp8", "none"],
                        help="weights of the plan: int8 | fp8 (8-bit experts and attention), "
                             "none (16-bit, the default)")
    parser.add_argument("--gpu-bandwidth", type=float, default=None, metavar="TB/s",
                        help="memory bandwidth per GPU: also predict the decode step from it")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _checkpoint_lines(path: str) -> tuple[ModelConfig, list[str]]:
    from ..checkpoint import describe_checkpoint

    if not Path(path).exists():
        raise CLIError(f"no checkpoint at {path}")
    try:
        d = describe_checkpoint(path)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CLIError(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}") from None
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(d["dtypes"].items()))
    return d["config"], [f"Checkpoint {d['path']}",
                         f"  {d['dialect']} dialect, {d['tensors']} tensors in {d['files']} file(s), "
                         f"{fmt_bytes(d['bytes'])} on disk ({dtypes})", ""]


def run(args) -> int:
    if sum(x is not None for x in (args.preset, args.checkpoint, args.config)) != 1:
        raise CLIError("give exactly one of --preset NAME, --checkpoint DIR or --config FILE.toml")
    lines: list[str] = []
    if args.preset is not None:
        cfg, title = _preset(args.preset)
        lines += [title, ""]
    elif args.config is not None:
        from ..train.config_io import load_toml

        cfg = load_toml(args.config).model.build()
        lines += [f"Config {args.config}", ""]
    else:
        cfg, lines = _checkpoint_lines(args.checkpoint)
    if args.gpus is not None or args.tensor_parallel is not None or args.quantization \
            or args.json or args.gpu_bandwidth is not None:
        return _cluster(args, cfg, lines)
    contexts = _contexts(args) if args.gpu_memory is not None else None
    print("\n".join(lines + [t.render() + "\n" for t in report(cfg)]).rstrip())
    if contexts:
        from ..infer.planner import GiB, fits_table, paged_fits_table

        print("\n" + fits_table(cfg, int(args.gpu_memory * GiB), contexts))
        print("\n" + paged_fits_table(cfg, int(args.gpu_memory * GiB), contexts))
    return 0


def _preset(name: str) -> tuple[ModelConfig, str]:
    """A model preset, or the model of a run preset (a name that is both is the same model)."""
    if name in MODEL_PRESETS:
        return ModelConfig.from_preset(name), f"Model preset {name}"
    if name in RUN_PRESETS:
        from ..train.config_io import from_preset

        model = from_preset(name).model
        return model.build(), f"Run preset {name}: model preset {model.preset or '(none)'}"
    raise CLIError(f"unknown preset {name!r}; model presets: {', '.join(MODEL_PRESETS)}; "
                   f"run presets: {', '.join(RUN_PRESETS)}")


def _contexts(args) -> list[int]:
    try:
        contexts = [int(x) for x in args.max_context.split(",") if x]
    except ValueError:
        raise CLIError(f"--max-context: expected integers, got {args.max_context!r}") from None
    if args.gpu_memory <= 0 or not contexts or min(contexts) <= 0:
        raise CLIError(f"--gpu-memory and --max-context must be positive, got "
                       f"{args.gpu_memory} and {args.max_context}")
    return contexts


def _cluster(args, cfg: ModelConfig, lines: list[str]) -> int:
    """Memory per GPU over --gpus GPUs (tensor parallel, 8-bit weights): what fits, or why not.
    Exit status 1 when nothing fits."""
    import json

    from ..infer.planner import GiB, plan_cluster

    if args.gpu_memory is None:
        raise CLIError("--gpus / --tensor-parallel / --quantization / --json plan memory: give "
                       "--gpu-memory GiB too")
    gpus = args.gpus or args.tensor_parallel or 1
    for name in ("gpus", "tensor_parallel", "gpu_bandwidth"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.gpu_memory <= 0:
        raise CLIError(f"--gpu-memory must be positive, got {args.gpu_memory}")
    contexts = _contexts(args) if args.max_context else None
    try:
        plan = plan_cluster(cfg, gpus, int(args.gpu_memory * GiB), quantization=args.quantization,
                            tensor_parallel=args.tensor_parallel, contexts=contexts,
                            bandwidth_tb_s=args.gpu_bandwidth, preset=args.preset or "")
    except ValueError as e:
        if not str(e).startswith("does not fit"):
            raise CLIError(str(e)) from None
        if args.json:
            print(json.dumps({"fits": False, "reason": str(e)}, indent=2))
        else:
            print("\n".join(lines + [f"{gpus} GPU(s) of {args.gpu_memory:g} GiB: {e}"]))
        return 1
    if args.json:
        print(json.dumps({"fits": True, **plan.to_json()}, indent=2))
    else:
        print("\n".join(lines + [plan.table()]))
    return 0
