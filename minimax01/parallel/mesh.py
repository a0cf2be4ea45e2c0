"""One DeviceMesh for data, context, expert and expert-tensor parallelism.

Ranks are laid out as (dp_replicate, dp_shard, cp) with cp fastest. Dense parameters are sharded
by FSDP2 over dp_shard x cp (every rank of a CP group computes gradients for the same weights)
and replicated over dp_replicate (HSDP). Experts are split over `ep` consecutive ranks of
dp_shard x cp (the paper's expert-parallel group); with expert tensor parallelism each expert's
intermediate dim is further split over `etp` ranks of dp_shard (the ETP group, just outside the
EP group: ETP ranks read different rows), and the experts are FSDP-sharded over the remaining
ranks (the expert-data-parallel group, EDP). An EP group covers whole CP groups (ep % cp == 0)
or lies inside one (cp % ep == 0); the mesh has six named dims so each group is a flattening of
dims:

    dp_replicate, dp_shard_out, etp, dp_shard_in, cp_out, cp_in
    ep  = dp_shard_in x cp_in      edp = dp_shard_out x cp_out      cp = cp_out x cp_in
    fsdp = dp_shard_out x etp x dp_shard_in x cp_out x cp_in        dp (batch) = replicate x shard
    experts' own mesh (etp, ep): ETP slices x EP blocks
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

DIMS = ("dp_replicate", "dp_shard_out", "etp", "dp_shard_in", "cp_out", "cp_in")


@dataclass(frozen=True)
class Layout:
    """Resolved degrees and the five mesh dim sizes."""

    world: int
    dp_replicate: int
    dp_shard: int
    cp: int
    ep: int
    etp: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read different rows."""
        return self.dp_replicate * self.dp_shard

    @property
    def edp(self) -> int:
        """Ranks of dp_shard x cp holding the same expert slices."""
        return self.dp_shard * self.cp // (self.ep * self.etp)

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        r, t = self.dp_replicate, self.etp
        if self.ep % self.cp == 0:
            inner = self.ep // self.cp
            return (r, self.dp_shard // (inner * t), t, inner, 1, self.cp)
        return (r, self.dp_shard // t, t, 1, self.cp // self.ep, self.ep)


def resolve_layout(cfg, world_size: int, num_experts: int | None = None,
                   intermediate_size: int | None = None) -> Layout:
    """Check a ParallelConfig's degrees against the world size (and the expert count and
    intermediate size); one-line errors naming the bad value."""
    etp = getattr(cfg, "etp", 1)
    for name in ("dp_replicate", "cp", "ep", "etp"):
        value = getattr(cfg, name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
    shard = cfg.dp_shard
    if shard == -1:
        rest = cfg.dp_replicate * cfg.cp
        if world_size % rest:
            raise ValueError(f"world size {world_size} is not divisible by parallel.dp_replicate "
                             f"x parallel.cp = {rest}")
        shard = world_size // rest
    elif not isinstance(shard, int) or isinstance(shard, bool) or shard < 1:
        raise ValueError(f"parallel.dp_shard must be a positive integer or -1, got {shard!r}")
    if cfg.dp_replicate * shard * cfg.cp != world_size:
        raise ValueError(f"parallel.dp_replicate x dp_shard x cp = {cfg.dp_replicate} x {shard} x "
                         f"{cfg.cp} = {cfg.dp_replicate * shard * cfg.cp}, but the world size is "
                         f"{world_size}")
    ep = cfg.ep
    if (shard * cfg.cp) % ep:
        raise ValueError(f"parallel.ep={ep} must divide dp_shard x cp = {shard * cfg.cp}")
    if ep % cfg.cp and cfg.cp % ep:
        raise ValueError(f"parallel.ep={ep} and parallel.cp={cfg.cp}: one must divide the other")
    if ep % cfg.cp == 0 and shard % (ep // cfg.cp):
        raise ValueError(f"parallel.ep={ep} spans {ep // cfg.cp} dp_shard ranks per CP group, "
                         f"which must divide dp_shard={shard}")
    if num_experts is not None and num_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide the number of experts ({num_experts})")
    inner = ep // cfg.cp if ep % cfg.cp == 0 else 1  # dp_shard ranks one EP group spans
    if shard % (inner * etp):
        raise ValueError(f"parallel.etp={etp} x the {inner} dp_shard rank(s) of an EP group must "
                         f"divide dp_shard={shard} (ETP groups are carved from dp_shard)")
    if intermediate_size is not None and intermediate_size % etp:
        raise ValueError(f"parallel.etp={etp} must divide the expert intermediate size "
                         f"({intermediate_size})")
    return Layout(world_size, cfg.dp_replicate, shard, cfg.cp, ep, etp)


class ParallelMesh:
    """The world DeviceMesh and the flattened sub-meshes every part of parallel/ uses."""

    def __init__(self, layout: Layout, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        self.layout = layout
        self.world = init_device_mesh(device_type, layout.shape, mesh_dim_names=DIMS)
        w = self.world
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # slicing flattened dims from the root mesh
            self.fsdp = w[DIMS[1:]]._flatten("dp_shard_cp")
            self.cp = w["cp_out", "cp_in"]._flatten("cp")
            self.ep = w["dp_shard_in", "cp_in"]._flatten("ep")
            self.etp = w["etp"]
            self.edp = w["dp_shard_out", "cp_out"]._flatten("edp")
            self.dp = w["dp_replicate", "dp_shard_out", "etp", "dp_shard_in"]._flatten("dp")
            # the experts' DTensor mesh: (etp, ep) with ETP, else ep
            self.expert_shards = w["etp", "ep"] if layout.etp > 1 else self.ep
            replicated = layout.dp_replicate > 1
            self.dense = w["dp_replicate", "dp_shard_cp"] if replicated else self.fsdp
            self.experts = w["dp_replicate", "edp"] if replicated else self.edp

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def cp_rank(self) -> int:
        return self.cp.get_local_rank()

    @property
    def ep_rank(self) -> int:
        return self.ep.get_local_rank()

    @property
    def etp_rank(self) -> int:
        return self.etp.get_local_rank()
