"""`python -m minimax01 <command>`: one entry point; each subcommand lives in
`minimax01/commands/<name>.py` with `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": "parameters, FLOPs per token and a memory table for a preset or checkpoint",
    "train": "train a model (single process or under torchrun)",
    "generate": "generate text from a checkpoint",
    "serve": "OpenAI-compatible HTTP server for a checkpoint",
    "eval": "long-context evaluations (niah, passkey, mrniah) and perplexity by position",
    "convert": "convert a checkpoint between the legacy and hf dialects",
    "ablate": "run an ablation suite (configs/ablations/) and write a comparison table",
    "plot": "draw a run's loss / eval / throughput / MoE-load curves from metrics.jsonl",
    "power": "power analysis: samples and seeds an experiment needs; compare two runs",
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minimax01",
                                     description="MiniMax-01 in PyTorch: train, run and serve.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(f"minimax01.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"minimax01.commands.{name}":
                raise
            p.set_defaults(_missing=name)
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    if argv[0] == "train":  # train takes free-form --section.key overrides
        args, extra = parser.parse_known_args(argv)
        args._extra = extra
    else:
        args = parser.parse_args(argv)
    args._argv = list(argv)  # a command that starts ranks of itself (serve --tensor-parallel)
    if getattr(args, "_missing", None):
        print(f"error: the '{args._missing}' command is not available in this build", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
