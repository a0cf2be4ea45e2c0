"""Run a function on N local processes joined by a gloo process group (CPU tests).

Processes are forked (the parent has torch imported already, so a child starts in well under a
second); a failure in any child re-raises in the test with the child's traceback."""

from __future__ import annotations

import os
import socket

import torch
import torch._dynamo  # noqa: F401  (imported once here, not in every forked child: ~5 s each)
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn, world_size: int, *args) -> None:
    """fn(rank, world_size, *args) on `world_size` processes."""
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       start_method="fork")
