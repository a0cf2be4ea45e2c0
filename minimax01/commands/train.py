"""`python -m minimax01 train [--preset NAME | --config FILE.toml] [--section.key value ...]`

Re-running the same command with the same train.out_dir resumes from its newest complete
checkpoint. Under torchrun every rank runs this command."""

from __future__ import annotations

import sys

from ..train.config import PRESETS, SECTIONS, parse_overrides, resolve


def add_arguments(parser) -> None:
    parser.add_argument("--preset", help=f"a training preset: {', '.join(PRESETS)}")
    parser.add_argument("--config", metavar="FILE.toml", help="a TOML file with the sections "
                        f"{', '.join(SECTIONS)}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as TOML and exit")
    parser.epilog = ("Any key can be overridden as --section.key value, e.g. "
                     "--train.steps 100 --optim.lr 1e-3 --model.num_hidden_layers 8. "
                     "See docs/training.md.")


def run(args) -> int:
    cfg = resolve(args.preset, args.config, parse_overrides(getattr(args, "_extra", [])))
    if args.print_config:
        cfg.validate()
        print(cfg.to_toml(), end="")
        return 0
    from ..train.trainer import Trainer, TrainingDiverged, make_world

    if cfg.train.stages:  # train/stages.py: one run per stage, in out_dir/stages/
        from ..train.stages import run_stages

        world = make_world(cfg)
        try:
            results = run_stages(cfg, world)
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            world.shutdown()
        result = results[-1]
    else:
        trainer = Trainer(cfg)
        try:
            result = trainer.fit()
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            trainer.world.shutdown()
    if result.stopped_by_signal:
        return 128 + int(result.stopped_by_signal)
    return 0
