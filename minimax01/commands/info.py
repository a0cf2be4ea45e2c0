"""`python -m minimax01 info --preset NAME | --checkpoint DIR`: parameters, FLOPs per token and a
memory table (weights, KV cache and lightning state per sequence) for a model configuration."""

from __future__ import annotations

from pathlib import Path

from ..accounting import fmt_bytes, report
from ..cli import CLIError
from ..config import PRESETS, ModelConfig


def add_arguments(parser) -> None:
    parser.add_argument("--preset", metavar="NAME", help=f"a preset: {', '.join(PRESETS)}")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="a checkpoint folder (reads config.json and the safetensors headers)")
    parser.add_argument("--config", metavar="FILE.toml",
                        help="a training config (its [model] section), e.g. configs/ablations/hybrid.toml")
    parser.add_argument("--gpu-memory", type=float, metavar="GiB",
                        help="also show how many sequences `serve` fits on a GPU of this size")
    parser.add_argument("--max-context", default="8192,131072,1048576", metavar="N[,N...]",
                        help="contexts for --gpu-memory (default 8192,131072,1048576)")


def _checkpoint_lines(path: str) -> tuple[ModelConfig, list[str]]:
    from ..checkpoint import describe_checkpoint

    if not Path(path).exists():
        raise CLIError(f"no checkpoint at {path}")
    d = describe_checkpoint(path)
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(d["dtypes"].items()))
    return d["config"], [f"Checkpoint {d['path']}",
                         f"  {d['dialect']} dialect, {d['tensors']} tensors in {d['files']} file(s), "
                         f"{fmt_bytes(d['bytes'])} on disk ({dtypes})", ""]


def run(args) -> int:
    if sum(x is not None for x in (args.preset, args.checkpoint, args.config)) != 1:
        raise CLIError("give exactly one of --preset NAME, --checkpoint DIR or --config FILE.toml")
    lines: list[str] = []
    if args.preset is not None:
        cfg = ModelConfig.from_preset(args.preset)
        lines += [f"Preset {args.preset}", ""]
    elif args.config is not None:
        from ..train.config import load_toml

        cfg = load_toml(args.config).model.build()
        lines += [f"Config {args.config}", ""]
    else:
        cfg, lines = _checkpoint_lines(args.checkpoint)
    contexts = _contexts(args) if args.gpu_memory is not None else None
    print("\n".join(lines + [t.render() + "\n" for t in report(cfg)]).rstrip())
    if contexts:
        from ..infer.planner import GiB, fits_table

        print("\n" + fits_table(cfg, int(args.gpu_memory * GiB), contexts))
    return 0


def _contexts(args) -> list[int]:
    try:
        contexts = [int(x) for x in args.max_context.split(",") if x]
    except ValueError:
        raise CLIError(f"--max-context: expected integers, got {args.max_context!r}") from None
    if args.gpu_memory <= 0 or not contexts or min(contexts) <= 0:
        raise CLIError(f"--gpu-memory and --max-context must be positive, got "
                       f"{args.gpu_memory} and {args.max_context}")
    return contexts
