"""Checks of the machine a run is about to use, made before anything is written: the device
`train.device` names exists, and `train.out_dir` is (or can become) a writable folder. The
config's own values are checked by RunConfig.validate (config.py); these need the machine."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def check_device(spec: str) -> None:
    """train.device names a device this machine has (ValueError naming the key if not)."""
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device {spec}: CUDA is not available on this machine "
                             f"(use cpu or auto)")
        index = torch.device(spec).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"train.device {spec}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif spec == "mps" and not (hasattr(torch.backends, "mps")
                                and torch.backends.mps.is_available()):
        raise ValueError("train.device mps: MPS is not available on this machine")


def check_out_dir(path: Path) -> None:
    """train.out_dir is a folder that exists and is writable, or can be created (checked
    before anything is written). ValueError naming the key if not."""
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"train.out_dir {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"train.out_dir {path} is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"train.out_dir {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"train.out_dir {path} cannot be created: {parent} is not writable")
