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
    if (args.preset is None) == (args.checkpoint is None):
        raise CLIError("give exactly one of --preset NAME or --checkpoint DIR")
    lines: list[str] = []
    if args.preset is not None:
        cfg = ModelConfig.from_preset(args.preset)
        lines += [f"Preset {args.preset}", ""]
    else:
        cfg, lines = _checkpoint_lines(args.checkpoint)
    print("\n".join(lines + [t.render() + "\n" for t in report(cfg)]).rstrip())
    return 0
