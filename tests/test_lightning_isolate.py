"""The GPU run's safety machinery, on the CPU: isolated jobs (crash, timeout, deadline), the
launch trace that names the kernel in flight, the check-results filter of the sweep's
candidates, and the sweep's crash-and-resume state (benchmarks/lightning_isolate.py,
check_lightning_gpu.py, lightning_tune.py)."""

import json
import os
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import check_lightning_gpu as chk  # noqa: E402
import lightning_isolate as iso  # noqa: E402
import lightning_tune as tune  # noqa: E402

from minimax01.ops.lightning.triton_tune import DEFAULT, Tuning  # noqa: E402


def _py(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_jobs_crash_timeout_deadline_and_ok(tmp_path):
    jobs = [iso.Job("ok", _py("print('fine')"), 30),
            iso.Job("abort", _py("import os; print('going'); os.abort()"), 30),
            iso.Job("slow", _py("import time; time.sleep(60)"), 1.5),
            iso.Job("late", _py("print('never')"), 30)]
    seen = []
    done = iso.run_jobs(jobs[:3], parallel=3, on_done=lambda j, q: seen.append(j.name))
    by = {j.name: j for j in done}
    assert by["ok"].rc == 0 and "fine" in by["ok"].out
    assert by["abort"].rc not in (0, None) and "going" in by["abort"].out
    assert by["slow"].timed_out and by["slow"].seconds < 20
    assert sorted(seen) == ["abort", "ok", "slow"]
    late = iso.run_jobs([jobs[3]], parallel=1, deadline=0.0)[0]
    assert late.rc is None and "not run" in late.out


def test_trace_names_the_kernel_in_flight(tmp_path):
    """A job that dies inside a launch: the trace's last open line is that launch (here a
    Triton-interpreted scan on the CPU, killed from inside the kernel call)."""
    trace = str(tmp_path / "t.trace")
    code = f"""
        import os, sys, torch
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})
        from lightning_isolate import trace_launches
        from minimax01.ops.lightning import triton_plan, triton_scan
        from minimax01.ops.lightning.triton_ops import triton_lightning_attn
        k = triton_scan.scan_kernel
        orig, calls = k.at, []
        class Boom:
            def __init__(self, inner): self.inner = inner
            def __getitem__(self, grid):
                launch = self.inner[grid]
                def run(*a, **kw):
                    calls.append(1)
                    if len(calls) == 2:
                        os.abort()  # what an illegal address does to a process, near enough
                    return launch(*a, **kw)
                return run
        k.at = lambda d: Boom(orig(d))
        trace_launches()  # wraps the launches above: the trace line is written first
        q = torch.randn(1, 40, 2, 16)
        with triton_plan.override(seg_len=16):
            triton_lightning_attn(q, q, q, torch.tensor([0.1, 0.2]))
    """
    job = iso.Job("boom", _py(code), 120, env={"PYTHONPATH": ROOT}, trace=trace)
    done = iso.run_jobs([job], parallel=1)[0]
    assert done.rc not in (0, None), done.out
    flight = iso.last_launch(trace)
    # the split forward: the local-state scan ran and returned, the main scan was in flight
    assert flight is not None and flight.startswith("scan_kernel"), (flight, done.out)
    assert "STATE_ONLY=False" in flight and "returned" not in flight
    with open(trace) as f:
        assert "STATE_ONLY=True" in f.read()


def _results(bad=(), missing=()):
    names = [n for n in chk.cases() if n != chk.CHOSEN_CASE]
    return {n: dict(status="CRASH" if n in bad else "ok") for n in names if n not in missing}


def test_sweep_candidates_only_what_passed():
    tma = tune.T(64, 32, 4, 3, True)
    a = tune.allowed(_results(bad=[chk.tiles_case(tma), chk.fused_case(tune.FUSED[1]),
                                   chk.LPT_CASE]))
    assert a["default"] and DEFAULT.fwd in a["fwd"] and tma not in a["fwd"] + a["bwd"]
    assert tune.T(64, 64, 8, 2) in a["fwd"] and len(a["fwd"]) == len(tune.FWD) - 1
    assert tune.FUSED[1] not in a["fused"] and tune.FUSED[0] in a["fused"]
    assert not a["lpt"] and a["decode"]
    # a case that never ran (out of time) is not a pass
    a = tune.allowed(_results(missing=[chk.tiles_case(tune.T(64, 128, 8, 2))]))
    assert tune.T(64, 128, 8, 2) not in a["fwd"] + a["state"]
    # the default failing: nothing is swept at all
    a = tune.allowed(_results(bad=["default H8 64K"]))
    assert not a["default"] and not a["fwd"] and not a["fused"] and not a["lpt"]
    assert tune.allowed(None)["default"] is False
    assert tune.allowed_from_json(json.loads(json.dumps(tune.allowed_to_json(a)))) == a


def test_every_sweep_candidate_has_a_check_case():
    names = set(chk.cases())
    for t in tune.FWD + tune.STATE + tune.BWD:
        assert t == DEFAULT.fwd or chk.tiles_case(t) in names
    for t in tune.FUSED:
        assert chk.fused_case(t) in names
    assert {chk.LPT_CASE, chk.DECODE_CASE, *chk.DEFAULT_CASES} <= names


def test_shipped_default_is_the_gpu_proven_h100_schedule():
    """Nothing unproven ships: no TMA, no fused pass; 128 x 32 state tiles, 4 warps, 3 stages on
    every pass (what the H100 measured). The default and the H100 entry use no longest-first
    order and the default decode slices; the H200 entry adds the two its own run checked on the
    card (longest-first order, decode slices: `ok chosen tuning`, BENCHMARKS.md 2026-12-02)."""
    from minimax01.ops.lightning.triton_tune import SHIPPED, Tiles
    proven = Tiles(block_t=64, block_v=32, num_warps=4, num_stages=3, tma=False)
    for name, tn in [("default", DEFAULT)] + list(SHIPPED.items()):
        assert (tn.fwd, tn.state, tn.dq, tn.rev) == (proven,) * 4
        assert tn.fused is None
        assert (tn.split_threshold, tn.programs_per_sm, tn.min_seg) == (2.0, 2.0, 1024)
        if name != "H200":
            assert not tn.lpt and tn.decode == ()
    assert SHIPPED["H200"].lpt and all(row[3] == 0 for row in SHIPPED["H200"].decode)


def test_sweep_resumes_after_a_crash(tmp_path, monkeypatch):
    """A candidate that poisons the CUDA context ends the child (exit 3) and is marked bad; a
    new child resumes from the saved state (no re-measurement) and still picks the best."""
    fast = tune.T(64, 64, 8, 2)
    boom = tune.T(64, 32, 4, 2)
    speed = {DEFAULT.fwd: 1.0, fast: 0.5, boom: 0.1, tune.T(64, 32, 8, 3): 0.9}
    calls = []

    def fake_time_row(row, tn, backward, rep=40):
        calls.append((row[0], tn.fwd))
        if tn.fwd == boom:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return speed[tn.fwd] * row[2] / 1000

    poisoned = [False]
    monkeypatch.setattr(tune, "time_row", fake_time_row)
    monkeypatch.setattr(tune, "_context_ok", lambda: not poisoned[0])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    state = str(tmp_path / "state.json")
    import time
    cands = [DEFAULT.fwd, boom, fast, tune.T(64, 32, 8, 3)]
    rows = tune.FWD_ROWS[:3]

    def stage(sw):
        return sw.stage("fwd", lambda tn: sw.pick("fwd", tn, [
            (tune.label(t), Tuning(fwd=t)) for t in cands], rows, backward=False), DEFAULT)

    poisoned[0] = True  # the boom candidate's error is sticky
    sw = tune.Sweep(state, time.time() + 60)
    with pytest.raises(SystemExit) as ex:
        stage(sw)
    assert ex.value.code == 3
    saved = json.load(open(state))
    assert saved["bad"] == [f"fwd|{tune.label(boom)}"] and "fwd" not in saved["done"]
    n_before = len(calls)
    poisoned[0] = False
    sw = tune.Sweep(state, time.time() + 60)  # the restarted child
    tn = stage(sw)
    assert tn.fwd == fast
    # the first child's measurements were reused: the default's first row is not timed again
    assert ("fwd H64 T4K", DEFAULT.fwd) not in calls[n_before:]
    assert all(t != boom for _, t in calls[n_before:])
    assert json.load(open(state))["done"]["fwd"]["fwd"]["block_v"] == 64


def test_isolated_cases_report_ok_fail_crash_timeout(tmp_path, monkeypatch):
    """check_lightning_gpu.run_isolated end to end on synthetic cases: every case in its own
    process, each verdict from its own process, a crash or hang costing only itself."""
    monkeypatch.setenv("LIGHTNING_CHECK_SELFTEST", "1")
    monkeypatch.setenv("PYTHONPATH", ROOT)
    lines = []
    names = ["selftest ok", "selftest fail", "selftest raise", "selftest crash", "selftest hang"]
    res = chk.run_isolated(names, parallel=5, work_dir=str(tmp_path), log=lines.append)
    status = {n: r["status"] for n, r in res.items()}
    assert status == {"selftest ok": "ok", "selftest fail": "FAIL", "selftest raise": "CRASH",
                      "selftest crash": "CRASH", "selftest hang": "TIMEOUT"}, (status, lines)
    assert res["selftest fail"]["fails"] == ["selftest fail"]
    assert "ZeroDivisionError" in res["selftest raise"]["error"]
    assert chk.passed(res, "selftest ok") and not chk.passed(res, "selftest crash")
    assert any(ln.startswith("TIMEOUT") and "selftest hang" in ln for ln in lines)
