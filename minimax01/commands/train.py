"""`python -m minimax01 train [--preset NAME | --config FILE.toml] [--section.key value ...]`

Re-running the same command with the same train.out_dir resumes from its newest complete
checkpoint. Under torchrun every rank runs this command."""

from __future__ import annotations

import sys

from ..cli import CLIError
from ..train.config import SECTIONS
from ..train.config_io import parse_overrides, resolve, to_toml
from ..train.presets import RUN_PRESETS
from ..train.stages import check_run, run_stages


def add_arguments(parser) -> None:
    parser.add_argument("--preset", metavar="NAME",
                        help=f"a run preset (a model preset with data, optimizer and loop "
                             f"settings): {', '.join(RUN_PRESETS)}")
    parser.add_argument("--config", metavar="FILE.toml", help="a TOML file with the sections "
                        f"{', '.join(SECTIONS)}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as TOML and exit")
    parser.epilog = ("Any key can be overridden as --section.key value, e.g. "
                     "--train.steps 100 --optim.lr 1e-3 --model.num_hidden_layers 8. "
                     "See docs/training.md.")


def run(args) -> int:
    cfg = resolve(args.preset, args.config, parse_overrides(getattr(args, "_extra", [])))
    from ..train.vl_train import is_vl_run, run_vl

    if is_vl_run(cfg):  # MiniMax-VL-01: its own loop (train/vl_train.py)
        if args.print_config:
            print(to_toml(cfg), end="")
            return 0
        run_vl(cfg)
        return 0
    if args.print_config:
        check_run(cfg)
        print(to_toml(cfg), end="")
        return 0
    from ..train.objectives import make_trainer
    from ..train.trainer import TrainingDiverged, make_world

    try:
        if cfg.train.stages:  # train/stages.py: one run per stage, in out_dir/stages/
            check_run(cfg)  # every stage's config, before a process group exists
            world = make_world(cfg)
            try:
                result = run_stages(cfg, world)[-1]
            finally:
                world.shutdown()
        else:
            trainer = make_trainer(cfg)
            try:
                result = trainer.fit()
            finally:
                trainer.world.shutdown()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # an unreadable data file, a full disk: one line, like bad input
        raise CLIError(_os_error(e)) from None
    if result.stopped_by_signal:
        return 128 + int(result.stopped_by_signal)
    return 0


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    return f"{where}{e.strerror or e}"
