"""Input validation of the lightning ops, without host synchronisation on the hot path.

What a check may cost decides where it runs:
  * shapes, dtypes and types are metadata: always checked, free;
  * values held on the host (CPU tensors, Python lists) are checked on the host: free of any device
    sync. Callers that build index tensors from host data (the engine's slot lists, a trainer's
    document lengths) validate there, with `check_slot_idx` / host `cu_seqlens`;
  * values held on the GPU are not read back by default (a sync per call would stall the training
    step and cannot run inside CUDA-graph capture). The kernels clamp every index they load, so bad
    device values give wrong numbers (NaN rows for bad slots), never an out-of-bounds access.
    With debug checks on (`MINIMAX01_DEBUG_CHECKS=1` or `debug_checks(True)`) device values are
    checked by `torch._assert_async`: no sync, graph-capturable, a device assert on failure.
  * slopes are few and long-lived (a layer's buffer): each slope tensor is read back once, the
    first time it is seen (and again after an in-place change), never during graph capture.
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch

_DEBUG: list = [None]  # None: follow the environment


def debug_checks_enabled() -> bool:
    if _DEBUG[0] is not None:
        return _DEBUG[0]
    return os.environ.get("MINIMAX01_DEBUG_CHECKS", "") not in ("", "0", "false", "False")


@contextlib.contextmanager
def debug_checks(enabled: bool = True):
    """Turn device-side value checks (torch._assert_async) on or off inside the block."""
    old = _DEBUG[0]
    _DEBUG[0] = bool(enabled)
    try:
        yield
    finally:
        _DEBUG[0] = old


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _on_host(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def require_tensor(x, name: str, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({what}), got {type(x).__name__}")


def require_float(x: torch.Tensor, name: str) -> None:
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


# ---- slopes ---------------------------------------------------------------------------------

_SLOPES_SEEN: dict = {}  # id -> (weakref, version)


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def check_slope(slope, heads: int) -> None:
    """slope: a floating [H] tensor of finite values >= 0 (decay exp(-slope) in (0, 1])."""
    require_tensor(slope, "slope", f"[H]=[{heads}] per-head decay rates")
    require_float(slope, "slope")
    if slope.shape != (heads,):
        raise ValueError(f"slope must have shape [H]=[{heads}], got {tuple(slope.shape)}")
    key = id(slope)
    seen = _SLOPES_SEEN.get(key)
    if seen is not None and seen[0]() is slope and seen[1] == _version(slope):
        return
    if _on_host(slope) or not _capturing():
        s = slope.detach()
        if not bool(torch.isfinite(s).all() & (s >= 0).all()):  # one read-back per slope tensor
            raise ValueError(f"slope must be finite and >= 0, got {s.cpu().tolist()}")
        if len(_SLOPES_SEEN) > 4096:
            _SLOPES_SEEN.clear()
        try:
            _SLOPES_SEEN[key] = (weakref.ref(slope), _version(slope))
        except TypeError:  # tensors that take no weak references: check every time
            pass
    elif debug_checks_enabled():
        s = slope.detach()
        torch._assert_async(torch.isfinite(s).all() & (s >= 0).all(),
                            "slope must be finite and >= 0")


# ---- packed documents -----------------------------------------------------------------------

def check_cu_seqlens(cu_seqlens, total: int, batch: int, host: bool) -> int:
    """Returns the number of documents. Values are checked on the host when they live there (or
    when `host`: a backend that reads them back anyway), on the device only in debug mode."""
    require_tensor(cu_seqlens, "cu_seqlens", "1-D integer offsets [0, n1, n1+n2, ..., T]")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch must be 1 (packed), got B={batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or not _is_integer(cu_seqlens.dtype):
        raise ValueError("cu_seqlens must be a 1-D integer tensor [0, n1, n1+n2, ..., T], got "
                         f"{cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
    if _on_host(cu_seqlens) or host:
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != total or any(
                x > y for x, y in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={total}; "
                             f"got {offsets[:4]}...{offsets[-2:]}")
    elif debug_checks_enabled():
        c = cu_seqlens
        torch._assert_async((c[0] == 0) & (c[-1] == total) & (c[1:] >= c[:-1]).all(),
                            "cu_seqlens must start at 0, be non-decreasing and end at T")
    return cu_seqlens.numel() - 1


def check_max_seqlen(max_seqlen, cu_seqlens, total: int) -> None:
    if max_seqlen is None:
        return
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"max_seqlen must be a non-negative int (host metadata), got "
                        f"{max_seqlen!r}")
    if cu_seqlens is not None and _on_host(cu_seqlens):
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is below the longest document ({longest})")
    elif cu_seqlens is None and max_seqlen < total:
        raise ValueError(f"max_seqlen={max_seqlen} is below the sequence length T={total}")


# ---- decode slots ---------------------------------------------------------------------------

def check_slot_idx(slots, rows: int) -> None:
    """Host-side check of decode slots (a list of ints or a CPU tensor): every slot in
    [0, rows), no slot twice. Cheap; call it where the indices are built."""
    if isinstance(slots, torch.Tensor):
        if not _is_integer(slots.dtype):
            raise TypeError(f"slot_idx must be an integer tensor, got {slots.dtype}")
        slots = slots.tolist()
    bad = [s for s in slots if not 0 <= s < rows]
    if bad:
        raise ValueError(f"slot_idx values must be in [0, {rows}); got {bad[:4]}")
    if len(set(slots)) != len(slots):
        seen, dup = set(), []
        for s in slots:
            if s in seen:
                dup.append(s)
            seen.add(s)
        raise ValueError(f"slot_idx must not repeat a slot; repeated: {dup[:4]}")


def check_decode_slots(slot_idx, batch: int, rows: int) -> None:
    require_tensor(slot_idx, "slot_idx", f"[B]=[{batch}] integer rows of the state pool")
    if not _is_integer(slot_idx.dtype):
        raise TypeError(f"slot_idx must be an integer tensor, got {slot_idx.dtype}")
    if slot_idx.shape != (batch,):
        raise ValueError(f"slot_idx must have shape [{batch}], got {list(slot_idx.shape)}")
    if _on_host(slot_idx):
        check_slot_idx(slot_idx, rows)
    elif debug_checks_enabled():
        s = slot_idx
        ok = ((s >= 0) & (s < rows)).all()
        if s.numel() > 1:
            srt = torch.sort(s).values
            ok = ok & (srt[1:] != srt[:-1]).all()
        torch._assert_async(ok, "slot_idx must be distinct rows in [0, N)")
