"""What `serve` and `generate` share under `--tensor-parallel N`: the flags, deciding whether this
process launches ranks, is one (torchrun or the launcher started it) or runs alone, and building
this rank's model."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..cli import CLIError

MAX_FULL_BUILD = 8 * 2 ** 30  # --preset under TP: build whole and slice below this many bytes


def add_tp_arguments(parser) -> None:
    parser.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                        help="split the model over N ranks (one per GPU; gloo processes with "
                             "--device cpu); started here, or by torchrun")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="with --tensor-parallel: whole experts per rank instead of every "
                             "expert's intermediate dim split")
    parser.add_argument("--tp-timeout", type=float, default=600.0, metavar="S",
                        help="seconds a rank waits on a collective before the group is declared "
                             "broken (default 600)")


def tp_mode(args) -> str:
    """"single", "launch" (start N ranks here) or "rank" (this process is one of them)."""
    from ..infer.tp_engine import distributed_env

    n = args.tensor_parallel
    if n is not None and n < 1:
        raise CLIError(f"--tensor-parallel must be >= 1, got {n}")
    if not args.tensor_parallel and args.expert_parallel:
        raise CLIError("--expert-parallel needs --tensor-parallel N")
    if not 0 < args.tp_timeout <= 86400:
        raise CLIError(f"--tp-timeout must be in (0, 86400] seconds, got {args.tp_timeout}")
    env = distributed_env()
    if env is not None and env[1] > 1:
        if n is not None and n != env[1]:
            raise CLIError(f"--tensor-parallel {n} but the launcher started {env[1]} processes "
                           f"(WORLD_SIZE)")
        return "rank"
    return "launch" if (n or 1) > 1 else "single"


def check_before_launch(args, config) -> None:
    """Fail in the launcher, with one line, on what every rank would fail on."""
    import torch

    from ..parallel.tp_plan import tp_shape

    n = args.tensor_parallel
    try:
        tp_shape(config, n, args.expert_parallel)
    except ValueError as e:
        raise CLIError(f"--tensor-parallel: {e}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if ":" in device:
            raise CLIError("--tensor-parallel: give --device cuda (rank r uses GPU r), not "
                           f"{device}")
        found = torch.cuda.device_count()
        if found < n:
            raise CLIError(f"--tensor-parallel {n} needs {n} GPUs, {found} are visible (use "
                           f"--device cpu for gloo processes)")
    elif device != "cpu":
        raise CLIError(f"--device {device}: tensor parallel runs on cuda or cpu")


def read_config(args):
    """The model config a command would load (checkpoint or preset), for checks."""
    from ..config import ModelConfig

    if getattr(args, "checkpoint", None):
        from ..checkpoint.reader import CheckpointReader

        if not Path(args.checkpoint).is_dir():
            raise CLIError(f"no checkpoint folder at {args.checkpoint}")
        with CheckpointReader(args.checkpoint) as r:
            return r.config
    return ModelConfig.from_preset(args.preset)


def setup_rank_logging(level: str, rank: int) -> None:
    logging.basicConfig(level=level.upper() if rank == 0 else max(logging.WARNING,
                                                                   getattr(logging, level.upper())),
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")


def rank_model(args, tp, device):
    """This rank's model: a checkpoint's slices, or --preset weights (small presets: the whole
    model built from --seed exactly as one process would, then sliced; big ones: random per
    rank on the meta device)."""
    import torch

    from ..model import MiniMaxForCausalLM
    from ..parallel.tensor_parallel import (load_tp_model, materialize_random,
                                            parallelize_for_inference)

    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.size))
    ep = args.expert_parallel
    quant = args.quantization
    if getattr(args, "checkpoint", None):
        return load_tp_model(args.checkpoint, tp, dtype=args.dtype, device=device,
                             quantization=quant, expert_parallel=ep)
    from ..config import ModelConfig
    from ..infer.prepare import cast_model
    from ..quant import quantize_model, quantize_on_meta, resolve

    cfg = ModelConfig.from_preset(args.preset)
    dtype = getattr(torch, args.dtype or cfg.dtype)
    if cfg.weight_bytes(torch.empty((), dtype=dtype).element_size()) <= MAX_FULL_BUILD:
        torch.manual_seed(args.seed)
        full = cast_model(MiniMaxForCausalLM(cfg).eval(), device, dtype)
        if quant not in (None, "none"):
            quantize_model(full, quant)
        return parallelize_for_inference(full, tp, expert_parallel=ep)
    logging.getLogger(__name__).warning(
        "--preset %s is too big to build whole: random weights drawn per rank", args.preset)
    meta = MiniMaxForCausalLM.from_config_on_meta(cfg.replace(dtype=str(dtype).split(".")[-1]))
    qc = resolve(quant)
    if qc is not None:
        quantize_on_meta(meta, qc)
    rank = cast_model(parallelize_for_inference(meta, tp, expert_parallel=ep), None, dtype)
    return materialize_random(rank, device, args.seed).eval()
