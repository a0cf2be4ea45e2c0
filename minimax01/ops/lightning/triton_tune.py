"""Per-GPU tuning of the Triton lightning kernels: which tiles, pipelines and work split to use.

The right tiles depend on the card (an H200 streams 40% more bytes per second than an H100 with
the same SMs, so the balance between the serial state chain and the loads moves). `tuning(device)`
picks, at run time, the entry of `SHIPPED` whose key is part of the device name (longest match),
else `DEFAULT`. A JSON file named by MINIMAX01_LIGHTNING_TUNING (written by
`benchmarks/lightning.py --tune`; `{device-name-substring: Tuning fields}`) is read first and wins.
Results never depend on the tuning beyond rounding: every choice here is a schedule of the same
arithmetic (tests/test_lightning_tuning.py runs different ones against each other).

Tiles are given for the model's shapes (D = E = 128, 16-bit inputs); `tile_config` in
triton_plan.py caps them to other head dims and lowers the pipeline depth where shared memory
would not hold it."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Tiles:
    block_t: int = 64     # tokens per block (a power of two in [16, 128])
    block_v: int = 32     # value columns per program (capped at the value dim)
    num_warps: int = 4
    num_stages: int = 3   # software pipeline depth of the block loop
    tma: bool = False     # TMA (tensor-descriptor) loads where the shapes allow (CUDA, sm90+)


@dataclass(frozen=True)
class Tuning:
    fwd: Tiles = Tiles()           # forward scan (o, final state)
    state: Tiles = Tiles()         # local-state passes of split sequences (forward and reverse)
    dq: Tiles = Tiles()            # dq scan
    rev: Tiles = Tiles()           # separate dv and dk reverse scans
    fused: Tiles | None = None     # fused dk+dv reverse scan (all of E per program); None: separate
    # split rule (triton_plan.make_plan): cut documents into segments when the longest is over
    # `split_threshold` x the balanced share, aiming at `programs_per_sm` programs per SM
    split_threshold: float = 2.0
    programs_per_sm: float = 2.0
    fused_programs_per_sm: float = 1.0
    min_seg: int = 1024
    lpt: bool = False              # order packed documents longest first (device argsort)
    # decode (D = E = 128): ((min B*H, block_v, num_warps, evict_first), ...), the row with the
    # largest min B*H <= B*H applies; empty: the widest slice that still gives >= 512 programs
    decode: tuple = field(default_factory=tuple)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Tuning":
        known = {f.name for f in dataclasses.fields(Tuning)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown lightning tuning fields {sorted(unknown)}")
        kw = dict(d)
        for name in ("fwd", "state", "dq", "rev", "fused"):
            if name in kw and kw[name] is not None:
                kw[name] = Tiles(**kw[name])
        if "decode" in kw:
            kw["decode"] = tuple(tuple(int(x) for x in row) for row in kw["decode"])
        return Tuning(**kw)


# Measured on H100 80GB HBM3 (bf16, D = E = 128; BENCHMARKS.md, 2026-11-26): a 128 x 32 fp32
# state tile, 4 warps, 3-deep pipeline, separate dk and dv passes. Also the default elsewhere.
DEFAULT = Tuning()

SHIPPED: dict[str, Tuning] = {
    "H100": DEFAULT,
    # Measured on H200 (141 GB, bf16, D = E = 128; BENCHMARKS.md, 2026-12-02,
    # `benchmarks/lightning.py --check --tune`): no tile, pipeline or fused-pass candidate beat
    # the H100 tiles (the sweep kept them); TMA candidates crash on Triton 3.6 and are excluded;
    # longest-first document order (0.994x, noise-level) and the decode slices were picked.
    "H200": Tuning(lpt=True, decode=((0, 16, 2, 0), (1024, 64, 8, 0), (4096, 64, 8, 0),
                                     (16384, 128, 4, 0))),
}

_LOADED: dict[str, Tuning] = {}
_ENV_READ = [False]


def load(path_or_dict) -> None:
    """Add entries ({device-name-substring: Tuning fields}) that win over the shipped table."""
    if isinstance(path_or_dict, (str, os.PathLike)):
        with open(path_or_dict) as f:
            data = json.load(f)
    else:
        data = path_or_dict
    if not isinstance(data, dict):
        raise ValueError("a lightning tuning file holds {device-name-substring: fields}")
    for key, value in data.items():
        _LOADED[str(key)] = value if isinstance(value, Tuning) else Tuning.from_json(value)
    tuning_for_name.cache_clear()


def reset() -> None:
    """Forget loaded entries (back to the shipped table)."""
    _LOADED.clear()
    tuning_for_name.cache_clear()


@functools.lru_cache(maxsize=16)
def tuning_for_name(name: str) -> Tuning:
    env = os.environ.get("MINIMAX01_LIGHTNING_TUNING")
    if env and not _ENV_READ[0]:
        _ENV_READ[0] = True  # read once per process
        load(env)
    for table in (_LOADED, SHIPPED):
        hits = [k for k in table if k.lower() in name.lower()]
        if hits:
            return table[max(hits, key=len)]
    return DEFAULT


@functools.lru_cache(maxsize=8)
def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device)


def tuning(device: torch.device) -> Tuning:
    return tuning_for_name(_device_name(device))
