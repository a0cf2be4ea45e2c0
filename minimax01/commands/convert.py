"""`python -m minimax01 convert SRC DST --dialect legacy|hf`: rewrite a checkpoint in the other
weight dialect (or re-shard / cast it), one shard at a time, copying the tokenizer files."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..cli import CLIError


def add_arguments(parser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint folder to read")
    parser.add_argument("dst", metavar="DST", help="folder to write (new, or empty)")
    parser.add_argument("--dialect", required=True,
                        help="legacy (official MiniMax-Text-01 names) or hf (transformers >= 5)")
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                        help="largest shard file, e.g. 2GB (default), 500MiB")
    parser.add_argument("--dtype", default=None,
                        help="cast the weights: float32, bfloat16 or float16 (default: keep)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty DST, replacing its checkpoint files")


def run(args) -> int:
    from ..checkpoint import convert_checkpoint

    if args.dialect not in ("legacy", "hf"):
        raise CLIError(f"--dialect must be legacy or hf, got {args.dialect!r}")
    if not Path(args.src).exists():
        raise CLIError(f"no checkpoint at {args.src}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("minimax01.checkpoint")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        files = convert_checkpoint(args.src, args.dst, args.dialect, max_shard_size=args.max_shard_size,
                                   dtype=args.dtype, overwrite=args.overwrite)
    except OSError as e:
        if isinstance(e, (FileNotFoundError, NotADirectoryError)):
            raise
        raise CLIError(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}") from None
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    print(f"wrote {args.dst} ({args.dialect} dialect, {len(files)} weight file(s))")
    return 0
