"""The serving engine under tensor parallelism: N ranks, one per GPU (or CPU process), each with
its slice of the model (parallel/tensor_parallel.py) and its own slot pool of its heads' caches.

    rank 0      the HTTP front end, tokenisation, the Scheduler, sampling: a `TPEngine` (an Engine
                whose every step first sends its `StepRecord` to the other ranks)
    rank r > 0  `follow(engine, channel)`: receive a record, run the same forwards
                (`Engine.run_step`), discard the logits; no scheduler, no requests

Every rank runs the same forwards in the same order, so the collectives inside them match.
Sampling happens on rank 0 only: the logits are all-gathered into every rank, but only rank 0 has
the requests' parameters and generators, and the sampled tokens reach the others as the next
record's decode tokens. Records travel on their own gloo group (`StepChannel`: one broadcast per
step, a second only for records over 1024 integers); while idle, rank 0 sends a heartbeat so the
followers' waits never reach the group timeout.

Failure: any error inside a step on rank 0 is fatal to the group (the ranks would no longer run
the same collectives): the requests in flight end with an error and the server shuts down with
status 1. A rank that dies makes the collectives of the others fail (gloo) or time out
(`--tp-timeout`, NCCL); the launcher (infer/ranks.py) or torchrun stops the rest at once."""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time

import torch
import torch.distributed as dist

from ..dtypes import dtype_name

from .engine import Engine
from .request import EngineError
from .step_record import StepRecord

log = logging.getLogger(__name__)

STEP, IDLE, STOP = 1, 2, 3
INLINE = 1024          # record integers sent with the header (a decode step of <= ~300 rows)
HEADER = 3             # kind, payload length, sequence number


class StepChannel:
    """Rank 0 -> every rank: step records, heartbeats and the stop message, broadcast over a
    gloo group (CPU tensors, whatever the model's device)."""

    def __init__(self, group: dist.ProcessGroup | None, src: int = 0):
        self.group, self.src = group, src
        self._lock = threading.Lock()
        self._sent = 0
        self._last = time.monotonic()
        self._beat: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ rank 0
    def _send(self, kind: int, ints: list[int]) -> None:
        with self._lock:
            head = torch.zeros(HEADER + INLINE, dtype=torch.int64)
            head[0], head[1], head[2] = kind, len(ints), self._sent
            inline = ints[:INLINE]
            head[HEADER:HEADER + len(inline)] = torch.tensor(inline, dtype=torch.int64)
            dist.broadcast(head, self.src, group=self.group)
            if len(ints) > INLINE:
                dist.broadcast(torch.tensor(ints[INLINE:], dtype=torch.int64), self.src,
                               group=self.group)
            self._sent += 1
            self._last = time.monotonic()

    def send(self, record: StepRecord) -> None:
        self._send(STEP, record.encode())

    def stop(self) -> None:
        """Tell every rank to stop (and end the heartbeat)."""
        self._stopping.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        self._send(STOP, [])

    def start_heartbeat(self, interval: float) -> None:
        """Send IDLE whenever nothing was sent for `interval` seconds."""
        def beat():
            while not self._stopping.wait(interval / 4):
                if time.monotonic() - self._last >= interval:
                    try:
                        self._send(IDLE, [])
                    except Exception as e:  # noqa: BLE001 - the group is gone: say it once
                        log.error("tensor-parallel heartbeat failed: %s", e)
                        return

        self._beat = threading.Thread(target=beat, name="minimax01-tp-heartbeat", daemon=True)
        self._beat.start()

    # ------------------------------------------------------------------ other ranks
    def recv(self) -> StepRecord | str | None:
        """The next message: a StepRecord, "idle", or None (stop)."""
        head = torch.zeros(HEADER + INLINE, dtype=torch.int64)
        dist.broadcast(head, self.src, group=self.group)
        kind, n, seq = (int(x) for x in head[:HEADER])
        if seq != self._sent:
            raise RuntimeError(f"tensor-parallel step channel out of order: message {seq}, "
                               f"expected {self._sent}")
        self._sent += 1
        if kind == STOP:
            return None
        if kind == IDLE:
            return "idle"
        ints = head[HEADER:HEADER + min(n, INLINE)].tolist()
        if n > INLINE:
            rest = torch.zeros(n - INLINE, dtype=torch.int64)
            dist.broadcast(rest, self.src, group=self.group)
            ints += rest.tolist()
        return StepRecord.decode(ints)


class TPEngine(Engine):
    """Rank 0's engine: sends every step's record before running it; a failed step is fatal
    (`failed` holds why, `on_fatal(message)` is called once, later steps refuse at once)."""

    def __init__(self, model, tokenizer, channel: StepChannel, **kw):
        super().__init__(model, tokenizer, step_broadcast=channel.send, **kw)
        self.channel = channel
        self.failed: str | None = None
        self.on_fatal = None

    def step(self):
        if self.failed is not None:
            raise EngineError(self.failed, "engine_unavailable")
        if self.device.type == "cuda":  # the engine thread's current device
            torch.cuda.set_device(self.device)
        try:
            return super().step()
        except Exception as e:
            self.failed = f"tensor-parallel step failed on rank 0: {type(e).__name__}: {e}"
            log.error("%s; stopping every rank", self.failed)
            if self.on_fatal is not None:
                self.on_fatal(self.failed)
            raise EngineError(self.failed, "engine_unavailable") from None  # logged once, above


def follow(engine: Engine, channel: StepChannel) -> int:
    """A rank > 0: run every record rank 0 sends until it says stop; returns the steps run."""
    steps = 0
    while True:
        msg = channel.recv()
        if msg is None:
            return steps
        if isinstance(msg, str):
            continue
        for slot in msg.reset:
            engine.pool.reset(slot)
        engine.run_step(msg)
        steps += 1


# ---------------------------------------------------------------------------- setting up
def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun or the launcher, else None."""
    if "WORLD_SIZE" not in os.environ:
        return None
    return (int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))))


def init_tensor_parallel(device: str | None, timeout_s: float):
    """Join the process group torchrun / the launcher describe (NCCL on GPUs, gloo on the CPU)
    and make the control group. Returns (TPGroup, StepChannel, device)."""
    from ..parallel.tp_modules import TPGroup

    env = distributed_env()
    if env is None:
        raise ValueError("tensor parallel ranks need WORLD_SIZE, RANK and MASTER_ADDR/PORT "
                         "(torchrun, or serve --tensor-parallel N which starts them)")
    rank, world, local = env
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.device_count() <= local:
            raise ValueError(f"rank {rank} needs GPU {local} but {torch.cuda.device_count()} "
                             f"are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    owns = not dist.is_initialized()
    if owns:
        if dev.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=dev)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout)
    tp = TPGroup()
    tp.owns_process_group = owns  # whoever initialised the group destroys it
    return tp, StepChannel(control), dev


def finish_tensor_parallel(tp) -> None:
    """Destroy the process group if `init_tensor_parallel` made it."""
    if getattr(tp, "owns_process_group", False) and dist.is_initialized():
        dist.destroy_process_group()


def agree_num_slots(model, device: torch.device, num_slots: int | None, max_context: int,
                    prefill_chunk: int, max_batch: int | None, utilization: float,
                    prefix_cache_bytes: int = 0) -> int | None:
    """On GPUs without --num-slots: each rank plans from its free memory (infer/planner.py, its
    own heads' caches) and all take the smallest, so every pool has the same slots."""
    if num_slots is not None or device.type != "cuda":
        return num_slots
    from .planner import plan_memory

    free, _ = torch.cuda.mem_get_info(device)
    dtype = next(model.parameters()).dtype
    plan = plan_memory(model.config, free, max_context, dtype=dtype_name(dtype),
                       prefill_chunk=prefill_chunk, max_slots=max_batch or 256,
                       utilization=utilization, prefix_cache_bytes=prefix_cache_bytes)
    n = torch.tensor([plan.num_slots], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return int(n.item())


def rank_engine(model, tokenizer, channel: StepChannel, rank: int, **kw) -> Engine:
    """Rank 0's TPEngine or another rank's Engine, with the same pool and graph settings. Prefill
    does not overlap decode on a second stream under TP (one order of collectives per rank), and
    decodes unfused (the fused lightning norm would span ranks)."""
    kw = {**kw, "overlap": False, "fused_decode": False,
          "fused_prefill": False}  # (a rank holds a slice of the heads)
    if rank == 0:
        return TPEngine(model, tokenizer, channel, **kw)
    return Engine(model, None, **kw)
