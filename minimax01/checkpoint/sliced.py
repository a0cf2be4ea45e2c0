"""Reading only parts of a checkpoint's tensors, straight from its safetensors shards (what one
tensor-parallel rank loads). Never reads a whole tensor unless asked to; never builds the model.

A part is described in the model's own parameter names and shapes (the hf names, whatever the
checkpoint's dialect):

    Slice(dim, ((start, stop), ...))   rows [start, stop) of `dim`, several ranges concatenated in
                                       order (w1 rows then w3 rows of gate_up_proj; a list of
                                       expert ids is consecutive runs of dim 0)
    ParamSlices = tuple of Slice       at most one per dim; () means the whole tensor
    plan: dict[param name -> ParamSlices]   what a rank needs (see parallel/tp_plan.py)

`SlicedReader(path).load(plan)` maps every request onto the checkpoint pieces that hold it (legacy
per-expert `w1`/`w3`/`w2` tensors, or hf stacked `gate_up_proj`/`down_proj`, or 8-bit tensors and
their `_scale` of a pre-quantised checkpoint) and reads each overlap with one
`safe_open(...).get_slice(name)[...]`. `bytes_read` and `reads` say exactly what was read. Every
problem (unknown parameter, out-of-range slice, tensor missing from the checkpoint) is reported
before a byte is read; a missing shard fails when the checkpoint is opened."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from .dialects import Piece, pieces
from .errors import CheckpointError
from ..dtypes import from_safetensors_code
from .quant_layout import quantized_pieces, stored_quantization
from .reader import CheckpointReader


@dataclass(frozen=True)
class Slice:
    dim: int
    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def range(cls, dim: int, start: int, stop: int) -> "Slice":
        return cls(dim, ((int(start), int(stop)),))

    @classmethod
    def ids(cls, dim: int, ids) -> "Slice":
        """Indices (e.g. expert ids) as consecutive runs, in the order given."""
        runs: list[list[int]] = []
        for i in (int(x) for x in ids):
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        return cls(dim, tuple((a, b) for a, b in runs))

    @property
    def length(self) -> int:
        return sum(b - a for a, b in self.ranges)


ParamSlices = tuple  # of Slice


def sliced_shape(shape: tuple[int, ...], slices: ParamSlices) -> tuple[int, ...]:
    out = list(shape)
    for s in slices:
        out[s.dim] = s.length
    return tuple(out)


def check_slices(param: str, shape: tuple[int, ...], slices: ParamSlices) -> None:
    dims = [s.dim for s in slices]
    if len(set(dims)) != len(dims):
        raise ValueError(f"{param}: two slices of the same dim")
    for s in slices:
        if not 0 <= s.dim < len(shape):
            raise ValueError(f"{param}: slice dim {s.dim} out of range for shape {list(shape)}")
        for a, b in s.ranges:
            if not 0 <= a <= b <= shape[s.dim]:
                raise ValueError(f"{param}: range [{a}, {b}) of dim {s.dim} is outside "
                                 f"[0, {shape[s.dim]})")


def _coverage(piece: Piece, ndim: int, shape: tuple[int, ...]):
    """Per model dim: (start, stop) of the model tensor the piece holds and whether the piece
    tensor keeps that dim (an int index drops it)."""
    out = []
    for d in range(ndim):
        ix = piece.index[d] if d < len(piece.index) else slice(None)
        if isinstance(ix, int):
            out.append((ix, ix + 1, False))
        else:
            start, stop, _ = ix.indices(shape[d])
            out.append((start, stop, True))
    return out


class SlicedReader:
    """`with SlicedReader(path) as r: tensors = r.load(plan, dtype=..., device=...)`."""

    def __init__(self, path: str | Path | CheckpointReader):
        from ..model import MiniMaxForCausalLM
        from ..quant import quantize_on_meta, quantized_tensors
        from .match import param_shapes_of

        self._own = not isinstance(path, CheckpointReader)
        self.reader = CheckpointReader(path) if self._own else path
        self.config = self.reader.config
        self.quantization = stored_quantization(self.reader.config_dict)
        with torch.device("meta"):
            model = MiniMaxForCausalLM(self.config)
        qnames: set[str] = set()
        if self.quantization is not None:
            quantize_on_meta(model, self.quantization)
            qnames = set(quantized_tensors(self.config, self.quantization))
        self.param_shapes = param_shapes_of(model)
        self.tied = self.config.tie_word_embeddings
        dialect = self.reader.dialect
        self.pieces: dict[str, list[Piece]] = {}
        for param, shape in self.param_shapes.items():
            if param.endswith("_scale") and param[:-len("_scale")] in qnames:
                continue
            fn = quantized_pieces if param in qnames else pieces
            for p in fn(param, shape, dialect):
                self.pieces.setdefault(p.param, []).append(p)
        if self.tied:  # lm_head is the embedding
            self.param_shapes["lm_head.weight"] = self.param_shapes["model.embed_tokens.weight"]
            self.pieces["lm_head.weight"] = self.pieces["model.embed_tokens.weight"]
        self.bytes_read = 0
        self.reads: list[tuple[str, tuple]] = []

    # ------------------------------------------------------------------ checks
    def check(self, plan: dict[str, ParamSlices]) -> None:
        unknown = [p for p in plan if p not in self.param_shapes]
        if unknown:
            raise ValueError(f"unknown model parameter(s) {', '.join(sorted(unknown)[:5])} "
                             f"(names are the model's hf names)")
        for param, slices in plan.items():
            check_slices(param, self.param_shapes[param], tuple(slices))
        entries = self.reader.entries
        missing, mismatched = [], {}
        for param in plan:
            for p in self.pieces[param]:
                e = entries.get(p.name)
                if e is None:
                    missing.append(p.name)
                elif e.shape != p.shape:
                    mismatched[p.name] = f"shape {list(e.shape)}, expected {list(p.shape)}"
        if missing or mismatched:
            raise CheckpointError.from_problems(
                f"checkpoint {self.reader.path} ({self.reader.dialect} dialect) lacks what the "
                f"plan reads", missing, [], mismatched)

    # ------------------------------------------------------------------ reading
    def read(self, param: str, slices: ParamSlices = (), dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
        """The part `slices` of model tensor `param` (whole with ()), in `dtype` (default as
        stored) on `device` (default CPU)."""
        slices = tuple(slices)
        self.check({param: slices})
        return self._read(param, slices, dtype, device)

    def load(self, plan: dict[str, ParamSlices], dtype: torch.dtype | None = None,
             device: torch.device | str | None = None, keep_dtype=()) -> dict[str, torch.Tensor]:
        """Every part of `plan`, checked first. Floating tensors are cast to `dtype` except
        8-bit weights, their fp32 scales and the names in `keep_dtype`."""
        self.check(plan)
        out = {}
        for param, slices in plan.items():
            stored = self._stored_dtype(param)
            keep = (stored in (torch.int8, getattr(torch, "float8_e4m3fn", None))
                    or param.endswith("_scale") or param in keep_dtype)
            out[param] = self._read(param, tuple(slices), None if keep else dtype, device)
        return out

    def _stored_dtype(self, param: str) -> torch.dtype:
        return from_safetensors_code(self.reader.entries[self.pieces[param][0].name].dtype)

    def _read(self, param, slices, dtype, device) -> torch.Tensor:
        shape = self.param_shapes[param]
        ndim = len(shape)
        want = {s.dim: s.ranges for s in slices}
        ranges = [want.get(d, ((0, shape[d]),)) for d in range(ndim)]
        out = torch.empty(sliced_shape(shape, slices), dtype=dtype or self._stored_dtype(param),
                          device=device)
        for piece in self.pieces[param]:
            cover = _coverage(piece, ndim, shape)
            per_dim = []  # per model dim: [(src slice in the piece or None, dst slice)]
            for d in range(ndim):
                c0, c1, kept = cover[d]
                hits, offset = [], 0
                for a, b in ranges[d]:
                    lo, hi = max(a, c0), min(b, c1)
                    if lo < hi:
                        src = slice(lo - c0, hi - c0) if kept else None
                        hits.append((src, slice(offset + lo - a, offset + hi - a)))
                    offset += b - a
                if not hits:
                    break
                per_dim.append(hits)
            else:
                for combo in itertools.product(*per_dim):
                    src = tuple(s for s, _ in combo if s is not None)
                    dst = tuple(d for _, d in combo)
                    t = self._get(piece.name, src)
                    box = tuple(d.stop - d.start for d in dst)
                    out[dst].copy_(t.reshape(box))
        return out

    def _get(self, name: str, index: tuple) -> torch.Tensor:
        t = self.reader.read(name, index)  # get_slice(name)[index]: only these bytes
        self.bytes_read += t.numel() * t.element_size()
        self.reads.append((name, index))
        return t

    def close(self) -> None:
        if self._own:
            self.reader.close()

    def __enter__(self) -> "SlicedReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
