"""Starting N tensor-parallel ranks of a command on this machine, as torchrun would, and keeping
them together: `python -m minimax01 serve --tensor-parallel N ...` runs `launch(argv, N)`.

Each rank is `python -m minimax01 <argv>` with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT a free port), in its own
session so that a terminal's Ctrl-C reaches only this launcher. The launcher then:

  * forwards SIGTERM / SIGINT to rank 0 only: rank 0 drains its requests and tells the other
    ranks to stop (a second signal kills every rank at once);
  * when a rank other than 0 fails (exits non-zero) while rank 0 runs, prints which one and its
    status, stops rank 0 (SIGTERM, then SIGKILL after `kill_after` seconds) and the rest, and
    exits 1 -- the other ranks cannot go on without it, and would otherwise wait on its
    collectives;
  * when rank 0 exits, gives the others `kill_after` seconds to follow, then exits with rank 0's
    status (1 if another rank failed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

LAUNCHED = "MINIMAX01_TP_LAUNCHED"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def launch(argv: list[str], n: int, kill_after: float = 10.0, poll: float = 0.1) -> int:
    """Run `python -m minimax01 *argv` as ranks 0..n-1; returns the exit status to use."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    for r in range(n):
        env = {**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               LAUNCHED: "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "minimax01", *argv], env=env,
                                      start_new_session=True))
    signals = {"count": 0}

    def on_signal(sig, frame):
        signals["count"] += 1
        if signals["count"] == 1:
            if procs[0].poll() is None:
                procs[0].send_signal(signal.SIGTERM)
        else:
            _kill(procs)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _watch(procs, kill_after, poll)
    finally:
        _kill(procs)
        for s, h in previous.items():
            signal.signal(s, h)


def _watch(procs: list[subprocess.Popen], kill_after: float, poll: float) -> int:
    failed = None
    while True:
        codes = [p.poll() for p in procs]
        if codes[0] is not None:
            break
        # a rank > 0 exits 0 only after rank 0's stop message: rank 0 is about to end too
        bad = next((r for r, c in enumerate(codes) if c not in (None, 0) and r > 0), None)
        if bad is not None:
            failed = bad
            _say(f"error: tensor-parallel rank {bad} exited with status {codes[bad]} while rank 0 "
                 f"was serving; stopping every rank")
            procs[0].send_signal(signal.SIGTERM)
            _wait([procs[0]], kill_after)
            break
        time.sleep(poll)
    _wait(procs, kill_after)
    codes = [p.poll() for p in procs]
    left = [r for r, c in enumerate(codes) if c is None]
    if left:
        _say(f"error: tensor-parallel rank(s) {left} did not stop within {kill_after:g}s; "
             f"killing them")
        _kill(procs)
    if failed is not None:
        return 1
    others = [(r, c) for r, c in enumerate(codes) if r > 0 and c not in (0, None)]
    if codes[0] == 0 and others:
        _say(f"error: tensor-parallel rank {others[0][0]} exited with status {others[0][1]}")
        return 1
    return codes[0] if codes[0] is not None and codes[0] >= 0 else 1


def _wait(procs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
