"""Run GPU work in fresh processes so that one illegal memory access cannot poison the rest.

A CUDA illegal address is sticky: after the first one every later call in that process fails,
so results of a process after its first crash mean nothing (the first GPU run of the lightning
checks lost most of its answers that way). Here each job is its own `python ...` subprocess
(fresh CUDA context, Triton's on-disk kernel cache shared through TRITON_CACHE_DIR), run a few
at a time with a timeout; a job's stdout is kept, and `trace_launches` (called inside the job)
appends one line per Triton kernel launch to a trace file, so a crashed job names the kernel
that was in flight (exact under CUDA_LAUNCH_BLOCKING=1, which the checks set).

`sanitizer_argv` wraps a job in `compute-sanitizer --tool memcheck` (PyTorch's caching
allocator off, so that every tensor is its own allocation and an overrun is seen at its edge)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

TRACE_ENV = "LIGHTNING_TRACE"


# ---- inside a job --------------------------------------------------------------------------

_CFG_KEYS = ("MODE", "REVERSE", "STATE_ONLY", "USE_TMA", "BLOCK_T", "BLOCK_K", "BLOCK_V", "DK",
             "DV", "HAS_ORDER", "SIN_BY_ITEM", "PREC", "num_warps", "num_stages")


class _TracedGrid:
    def __init__(self, inner, name, fd):
        self.inner, self.name, self.fd = inner, name, fd

    def __getitem__(self, grid):
        launch = self.inner[grid]

        def run(*args, **kwargs):
            cfg = " ".join(f"{k}={kwargs[k]}" for k in _CFG_KEYS if k in kwargs)
            os.write(self.fd, f"> {self.name} grid={tuple(grid)} {cfg}\n".encode())
            out = launch(*args, **kwargs)
            os.write(self.fd, b"<\n")
            return out
        return run


def trace_launches(path: str | None = None) -> None:
    """Record every launch of the lightning kernels (name, grid, tiles) in `path` (default: the
    LIGHTNING_TRACE variable): '> name ...' before the launch, '<' after it returns."""
    path = path or os.environ.get(TRACE_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    from minimax01.ops.lightning import (triton_combine, triton_decode, triton_dkdv,
                                         triton_items, triton_scan)

    for mod, name in ((triton_scan, "scan_kernel"), (triton_dkdv, "dkdv_kernel"),
                      (triton_combine, "combine_kernel"), (triton_items, "items_kernel"),
                      (triton_decode, "decode_kernel")):
        k = getattr(mod, name)
        orig = k.at
        k.at = (lambda orig, name: lambda device: _TracedGrid(orig(device), name, fd))(orig, name)


def last_launch(path: str) -> str | None:
    """The launch in flight when the job died: the last '>' line not followed by '<'."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(">"):
            done = i + 1 < len(lines) and lines[i + 1].startswith("<")
            return lines[i][2:] + ("" if not done else " (returned; the fault surfaced later)")
    return None


# ---- the parent ----------------------------------------------------------------------------

@dataclass
class Job:
    name: str
    argv: list
    timeout: float
    env: dict = field(default_factory=dict)
    trace: str | None = None
    # filled in by run_jobs
    rc: int | None = None
    out: str = ""
    seconds: float = 0.0
    timed_out: bool = False


def run_jobs(jobs, parallel: int, on_done=None, deadline: float | None = None):
    """Run `jobs` (list of Job; more may be appended by `on_done(job, queue)`) `parallel` at a
    time. Each gets its timeout (and nothing past `deadline`). Returns the finished jobs."""
    queue = list(jobs)
    running, done = [], []
    while queue or running:
        while queue and len(running) < parallel:
            job = queue.pop(0)
            if deadline is not None and time.time() >= deadline:
                job.rc, job.out = None, "not run: out of time"
                done.append(job)
                if on_done:
                    on_done(job, queue)
                continue
            env = dict(os.environ)
            env.update(job.env)
            env["PYTHONUNBUFFERED"] = "1"
            if job.trace:
                env[TRACE_ENV] = job.trace
                open(job.trace, "w").close()
            log = tempfile.TemporaryFile("w+")
            p = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
            limit = job.timeout if deadline is None else min(job.timeout,
                                                             max(5.0, deadline - time.time()))
            running.append((job, p, log, time.time(), limit))
        time.sleep(0.2)
        for item in list(running):
            job, p, log, t0, limit = item
            rc = p.poll()
            if rc is None and time.time() - t0 < limit:
                continue
            if rc is None:  # past its time: end it (and what it started), by its own id
                job.timed_out = True
                _kill(p)
                rc = p.wait()
            running.remove(item)
            job.rc, job.seconds = rc, time.time() - t0
            log.seek(0)
            job.out = log.read()
            log.close()
            done.append(job)
            if on_done:
                on_done(job, queue)
    return done


def _kill(p: subprocess.Popen) -> None:
    import signal
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the job's own process group (start_new_session)
    except (ProcessLookupError, PermissionError):
        p.kill()


def find_sanitizer() -> str | None:
    exe = shutil.which("compute-sanitizer")
    if exe:
        return exe
    for pat in ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda*/bin/compute-sanitizer",
                "/opt/nvidia/*/compute-sanitizer/compute-sanitizer",
                "/usr/local/cuda*/compute-sanitizer/compute-sanitizer"):
        hits = sorted(glob.glob(pat))
        if hits:
            return hits[-1]
    return None


def sanitizer_argv(argv: list) -> tuple[list, dict] | None:
    """(argv under compute-sanitizer memcheck, extra env) or None when it is not installed."""
    exe = find_sanitizer()
    if exe is None:
        return None
    return ([exe, "--tool", "memcheck", "--print-limit", "12", "--show-backtrace", "no"] + argv,
            {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})


def sanitizer_summary(out: str, limit: int = 14) -> list:
    """The lines of a memcheck report that say what and where (kernel, file:line, address)."""
    keep = [ln.strip() for ln in out.splitlines() if ln.startswith("=========")
            and any(w in ln for w in ("Invalid", "at ", "by thread", "Address", "ERROR SUMMARY",
                                      "Program hit", "is out of bounds", "Misaligned"))]
    return keep[:limit]


def python_argv(script: str, *args) -> list:
    return [sys.executable, script, *args]
