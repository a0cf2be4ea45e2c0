"""Runs an Engine on its own thread and hands each request's outputs to asyncio code.

The engine thread owns the engine: requests and aborts reach it through a locked inbox and are
applied between steps; outputs go back through `loop.call_soon_threadsafe` into one asyncio
queue per request. A failing step (out of memory, say) ends the requests in it with an error and
the thread carries on serving. `drain(grace)` (safe in a signal handler) refuses new requests
and, `grace` seconds later, ends whatever still runs with a "server_shutdown" error, so every
open stream gets a final event before the server goes down."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from .engine import Engine
from .request import EngineError, SamplingParams, StepOutput

SHUTDOWN = "the server is shutting down"

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._inbox: list[tuple] = []
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._drain_at: float | None = None   # monotonic time at which running requests end
        self._thread: threading.Thread | None = None
        self.counts = {"submitted": 0, "finished": 0, "aborted": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="minimax01-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; pending requests end with finish_reason "abort"."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for rid in list(self._queues):
            self._deliver(StepOutput(rid, [], "", None, True, "error", error=SHUTDOWN,
                                     error_code="server_shutdown"))

    def drain(self, grace: float) -> None:
        """Refuse new requests now; end the running ones `grace` seconds from now. Only sets an
        attribute, so it is safe to call from a signal handler."""
        if self._drain_at is None:
            self._drain_at = time.monotonic() + max(grace, 0.0)

    @property
    def draining(self) -> bool:
        return self._drain_at is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ requests
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None, images=None,
               image_digests=None) -> tuple[str, asyncio.Queue]:
        """Validate (RequestError on a bad request) and queue; returns the id and the queue that
        receives its StepOutputs, the last one with finished=True. Call from the event loop.
        EngineError "engine_unavailable" / "server_shutdown" when it cannot take requests."""
        if self._drain_at is not None:
            raise EngineError(SHUTDOWN, "server_shutdown")
        if not self.alive:
            raise EngineError("the engine is not running", "engine_unavailable")
        seq = self.engine.make_sequence(prompt_ids, params, request_id, images, image_digests)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._queues[seq.request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append(("add", seq))
            self.counts["submitted"] += 1
        self._wake.set()
        return seq.request_id, queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._queues:
                return
            self._queues.pop(request_id)
            self._inbox.append(("abort", request_id))
            self.counts["aborted"] += 1
        self._wake.set()

    def load(self) -> dict:
        sched = self.engine.scheduler
        out = {"running": len(sched.running), "waiting": len(sched.waiting),
               "free_slots": self.engine.pool.free_slots, "preemptions": sched.num_preemptions,
               "requests": dict(self.counts)}
        pages = self.engine.pool.pages
        if pages is not None:
            out["kv_pages"] = {"page_size": pages.page_size, "total": pages.capacity,
                               "free": pages.free_pages}
        if self.engine.prefix_cache is not None:
            out["prefix_cache"] = self.engine.prefix_cache.info()
        return out

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, out: StepOutput) -> None:
        with self._lock:
            target = self._queues.get(out.request_id)
            if target is not None and out.finished:
                self._queues.pop(out.request_id)
                self.counts["finished"] += 1
        if target is not None:
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _run(self) -> None:
        engine = self.engine
        while not self._stop:
            if self._drain_at is not None and time.monotonic() >= self._drain_at:
                self._end_all()
            with self._lock:
                inbox, self._inbox = self._inbox, []
            for kind, item in inbox:
                if kind == "add":
                    engine.scheduler.add(item)
                else:
                    engine.abort(item)
            if not engine.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # keep serving: end what was in flight with an error
                if isinstance(e, EngineError):  # an expected failure, already explained
                    log.error("engine step failed: %s", e)
                else:
                    log.exception("engine step failed")
                outputs = self._fail_all(f"{type(e).__name__}: {e}")
            for out in outputs:
                self._deliver(out)
        for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
            engine.abort(seq.request_id)
        engine.scheduler.reap()

    def _end_all(self) -> None:
        """The drain deadline passed: end every request still in the engine with an error."""
        engine = self.engine
        for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
            if engine.abort(seq.request_id):
                self._deliver(StepOutput(seq.request_id, [], "", None, True, "error",
                                         len(seq.prompt_ids), len(seq.output_ids),
                                         error=SHUTDOWN, error_code="server_shutdown"))
        with self._lock:  # requests submitted since: never started
            inbox, self._inbox = self._inbox, []
        for kind, item in inbox:
            if kind == "add":
                self._deliver(StepOutput(item.request_id, [], "", None, True, "error",
                                         len(item.prompt_ids), 0, error=SHUTDOWN,
                                         error_code="server_shutdown"))

    def _fail_all(self, message: str) -> list[StepOutput]:
        sched = self.engine.scheduler
        outs = []
        for seq in list(sched.running) + list(sched.waiting):
            if not seq.finished:
                seq.finish_reason = "error"
            outs.append(StepOutput(seq.request_id, [], "", None, True, "error",
                                   len(seq.prompt_ids), len(seq.output_ids), error=message,
                                   error_code="generation_failed"))
        for seq in list(sched.running):
            sched.pool.release(seq.slot)
            seq.slot = None
        sched.running.clear()
        sched.waiting.clear()  # (a failed step leaves no cache state: steps are records)
        if self.engine.prefix_cache is not None:  # its snapshots may be half written: forget them
            self.engine.prefix_cache.take_ops()
            self.engine.prefix_cache.clear()
            loads, ops = self.engine.prefix_cache.take_ops()
            self.engine.prefix_store.apply_after(ops)
        return outs
