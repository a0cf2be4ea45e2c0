"""8-bit checkpoints (docs/quantization.md): saving and loading pre-quantised folders, quantising a
16-bit checkpoint while it loads, and rewriting a 16-bit checkpoint as a quantised one on disk.

Layout: a quantised tensor keeps its checkpoint name (either dialect) with dtype I8 or F8_E4M3; its
fp32 per-output-channel scales are "<name>_scale" with the tensor's shape minus the last dim, so
the per-expert legacy names get per-expert scales (`...experts.{e}.w1.weight_scale` [I]) and the
hf names stacked ones (`...mlp.experts.gate_up_proj_scale` [E, 2I]). config.json carries a
`quantization_config` entry (QuantConfig.to_json). Everything else is stored as in a 16-bit
checkpoint.

Loading from 16 bits quantises one checkpoint piece at a time on the target device (one expert's
w1, or one expert's slice of a stacked gate_up_proj): the 16-bit model is never materialised.
Scales are per row, so piece-wise quantisation gives the bytes of whole-tensor quantisation."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..dtypes import FLOAT_CODES, FLOAT_DTYPES, dtype_name, resolve_dtype, torch_dtype
from ..ops.quant import quantize, storage_dtype
from ..quant import QuantConfig, check_supported, quantize_on_meta, quantized_tensors, resolve
from ..quant.apply import quantization_of
from .dialects import DERIVED, DIALECTS, Piece, pieces
from .quant_layout import (CONFIG_KEY, QUANT_CODES, checkpoint_layout, quantized_pieces,  # noqa: F401
                           scale_name, stored_quantization)
from .errors import CheckpointError
from .hf import _materialize_buffers, copy_tokenizer_files, load_pretrained, save_pretrained
from .match import TIED_HEAD, Match, match, param_shapes_of
from .reader import CONFIG_NAME, CheckpointReader
from .writer import Source, parse_size, write_checkpoint

log = logging.getLogger("minimax01.checkpoint")

# ---------------------------------------------------------------------- saving
def save_quantized(model: torch.nn.Module, path: str | Path, dialect: str = "legacy",
                   max_shard_size: str | int = "2GB", tokenizer=None) -> list[str]:
    """Write a quantised model as a pre-quantised checkpoint folder (exact: the 8-bit bytes and
    the fp32 scales are stored as they are)."""
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be 'legacy' or 'hf', got {dialect!r}")
    qc = quantization_of(model)
    if qc is None:
        raise ValueError("save_quantized: the model has no quantised modules")
    config = model.config
    dtype = model.model.embed_tokens.weight.dtype
    if dtype_name(dtype) in FLOAT_DTYPES:
        config = config.replace(dtype=dtype_name(dtype))
    hf_config = config.to_hf_config(dialect)
    hf_config[CONFIG_KEY] = qc.to_json()
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop(TIED_HEAD, None)
    qnames = set(quantized_tensors(config, qc))
    layout = checkpoint_layout({n: tuple(t.shape) for n, t in state.items()}, qnames, dialect)
    sources = [Source(p.name, p.shape, state[p.param].dtype,
                      lambda t=state[p.param], index=p.index: t[index] if index else t)
               for p in layout.values()]
    extras = tokenizer.save if tokenizer is not None else None  # saved with the weights, atomically
    return write_checkpoint(path, hf_config, sources, max_shard_size, extras=extras)


def save_any(model, path, dialect="legacy", max_shard_size="2GB", tokenizer=None) -> list[str]:
    """`model.save_pretrained`: pre-quantised layout for a quantised model, 16-bit otherwise."""
    if quantization_of(model) is not None:
        return save_quantized(model, path, dialect, max_shard_size, tokenizer)
    return save_pretrained(model, path, dialect=dialect, max_shard_size=max_shard_size,
                           tokenizer=tokenizer)


# ---------------------------------------------------------------------- loading
def _peek_config(path: Path) -> dict:
    try:
        data = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return {}  # CheckpointReader reports a bad or missing config.json properly
    return data if isinstance(data, dict) else {}


def choose(stored: QuantConfig | None, requested) -> QuantConfig | None:
    """What to load as: the stored format (a request must agree with it) or the request."""
    if stored is None:
        return resolve(requested)
    if requested is None or (isinstance(requested, str) and requested == stored.format):
        return stored
    if requested == "none":
        raise ValueError(f"the checkpoint holds {stored.format} weights; it cannot be loaded "
                         f"with quantization='none' (load it as {stored.format}, or load the "
                         f"16-bit original)")
    want = resolve(requested)
    if want.format != stored.format:
        raise ValueError(f"the checkpoint holds {stored.format} weights, not {want.format}: load "
                         f"it with quantization={stored.format!r} (re-quantising 8-bit weights "
                         f"would lose precision)")
    return stored


def load_any(cls, path, dtype=None, device=None, quantization=None):
    """`MiniMaxForCausalLM.from_pretrained`: a 16-bit load, a load-time quantisation or a
    pre-quantised load, as the checkpoint and `quantization` ("int8" | "fp8" | "none" | None)
    say."""
    path = Path(path)
    stored = stored_quantization(_peek_config(path)) if path.is_dir() else None
    qc = choose(stored, quantization)
    if qc is None:
        return load_pretrained(cls, path, dtype=dtype, device=device)
    return load_quantized(cls, path, qc, dtype=dtype, device=device)


def _check_prequantized(reader: CheckpointReader, expected: dict[str, Piece], qnames: set[str],
                        qc: QuantConfig, tied: bool, embed_shape) -> None:
    code = QUANT_CODES[qc.format]
    scales = {scale_name(n) for n in qnames}
    found = reader.entries
    missing = [n for n in expected if n not in found]
    unexpected, mismatched = [], {}
    for name, entry in found.items():
        piece = expected.get(name)
        if piece is None:
            if DERIVED.fullmatch(name):
                continue
            if tied and name == TIED_HEAD and entry.shape == embed_shape:
                continue
            unexpected.append(name)
            continue
        want = code if piece.param in qnames else "F32" if piece.param in scales else None
        if entry.shape != piece.shape:
            mismatched[name] = f"shape {list(entry.shape)}, expected {list(piece.shape)}"
        elif want is not None and entry.dtype != want:
            mismatched[name] = f"dtype {entry.dtype}, expected {want}"
        elif want is None and entry.dtype not in FLOAT_CODES:
            mismatched[name] = f"dtype {entry.dtype}, expected a float type"
    if missing or unexpected or mismatched:
        raise CheckpointError.from_problems(
            f"pre-quantised ({qc.format}) checkpoint {reader.path} ({reader.dialect} dialect) "
            f"does not match its config", missing, unexpected, mismatched)


def _quantize_param(m: Match, param: str, fmt: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a 16-bit model tensor piece by piece (an expert at a time), quantising each on `device`."""
    shape = m.param_shapes[param]
    q = torch.empty(shape, dtype=storage_dtype(fmt), device=device)
    s = torch.empty(shape[:-1], dtype=torch.float32, device=device)
    for p in m.by_param[param]:
        if len(p.shape) >= 3:  # a stacked tensor: one leading index at a time
            for j in range(p.shape[0]):
                qj, sj = quantize(m.reader.read(p.name, (j,)).to(device), fmt)
                q[p.index][j], s[p.index][j] = qj, sj
        else:
            qp, sp = quantize(m.reader.read(p.name).to(device), fmt)
            q[p.index], s[p.index] = qp, sp
    return q, s


def load_quantized(cls, path, qc: QuantConfig, dtype=None, device=None):
    """Build `cls(config)` on the meta device with 8-bit modules swapped in and fill it: from a
    pre-quantised checkpoint as stored, or from a 16-bit one quantising each piece as it is read.
    dtype: of the 16-bit tensors (default the config's); device: default "cpu"."""
    dtype = resolve_dtype(dtype)
    device = torch.device(device if device is not None else "cpu")
    check_supported(qc.format, device)
    start = time.perf_counter()
    with CheckpointReader(path) as reader:
        stored = stored_quantization(reader.config_dict)
        config: ModelConfig = reader.config
        dtype = dtype or torch_dtype(config.dtype)
        config = config.replace(dtype=dtype_name(dtype))
        with torch.device("meta"):
            model = cls(config)
        plain_shapes = param_shapes_of(model)
        quantize_on_meta(model, qc)
        shapes = param_shapes_of(model)
        qnames = set(quantized_tensors(config, qc))
        tied = config.tie_word_embeddings
        state: dict[str, torch.Tensor] = {}
        if stored is not None:
            layout = checkpoint_layout(shapes, qnames, reader.dialect)
            _check_prequantized(reader, layout, qnames, qc, tied,
                                shapes.get("model.embed_tokens.weight"))
            by_param: dict[str, list[Piece]] = {p: [] for p in shapes}
            for piece in layout.values():
                by_param[piece.param].append(piece)
            m = Match(reader, dict(shapes), by_param, tied)
            m.check_tied_head()
            scales = {scale_name(n) for n in qnames}
            for param in shapes:
                keep = param in qnames  # 8-bit bytes as stored
                want = None if keep else torch.float32 if param in scales else dtype
                state[param] = m.read_param(param, dtype=want, device=device)
        else:
            m = match(reader, plain_shapes, tied)
            m.check_tied_head()
            for param in plain_shapes:
                if param in qnames:
                    state[param], state[scale_name(param)] = _quantize_param(m, param, qc.format,
                                                                             device)
                else:
                    state[param] = m.read_param(param, dtype=dtype, device=device)
        log.info("loaded %s as %s (%s) on %s", reader.path, qc.format,
                 "pre-quantised" if stored else "quantised while loading", device)
    if tied:
        state[TIED_HEAD] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_buffers(model, device)
    log.info("loaded %s in %.1fs", path, time.perf_counter() - start)
    return model.eval()


# ---------------------------------------------------------------------- on disk
def read_index(sr, param: str, index: tuple) -> torch.Tensor:
    """`param`[index] for an index of leading ints and slices, read through a SlicedReader (only
    those bytes, whichever dialect holds them)."""
    from .sliced import Slice

    shape = sr.param_shapes[param]
    slices, drop = [], []
    for d, ix in enumerate(index):
        if isinstance(ix, int):
            slices.append(Slice.range(d, ix, ix + 1))
            drop.append(d)
        else:
            a, b, _ = ix.indices(shape[d])
            slices.append(Slice.range(d, a, b))
    t = sr.read(param, tuple(slices))
    for d in reversed(drop):
        t = t.squeeze(d)
    return t


def quantize_checkpoint(src: str | Path, dst: str | Path, quantization="int8",
                        dialect: str | None = None, max_shard_size: str | int = "2GB",
                        modules=None, device: str | torch.device = "cpu",
                        overwrite: bool = False) -> list[str]:
    """Rewrite the 16-bit checkpoint `src` as a pre-quantised one at `dst` (dialect: default
    `src`'s), streaming one piece at a time: neither model is ever built. Tokenizer files are
    copied. `device` does the rounding (a GPU is faster; the bytes are the same)."""
    qc = resolve(quantization, modules)
    if qc is None:
        raise ValueError("quantize_checkpoint: give quantization='int8' or 'fp8'")
    parse_size(max_shard_size)
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"the destination {dst} is not empty (pass overwrite=True to write into it)")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"the destination {dst} is the source; choose another folder")
    from .sliced import SlicedReader

    with CheckpointReader(src) as reader:
        if stored_quantization(reader.config_dict) is not None:
            raise ValueError(f"{src} is already quantised")
        dialect = dialect or reader.dialect
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be 'legacy' or 'hf', got {dialect!r}")
        config = reader.config
        sr = SlicedReader(reader)
        shapes = dict(sr.param_shapes)
        if config.tie_word_embeddings:
            shapes.pop(TIED_HEAD, None)
        sr.check({p: () for p in shapes})
        qnames = set(quantized_tensors(config, qc))
        hf_config = config.to_hf_config(dialect)
        hf_config[CONFIG_KEY] = qc.to_json()
        done: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

        def region(param, index):
            """model tensor `param`[index] (ints and slices), read through the sliced reader."""
            return read_index(sr, param, index)

        def quantized(param, index, shape, part):
            """(q, scale)[part] of one piece; a stacked piece is quantised a slice at a time."""
            key = (param, repr(index))
            if key not in done:
                if len(shape) >= 3:
                    q = torch.empty(shape, dtype=storage_dtype(qc.format))
                    s = torch.empty(shape[:-1], dtype=torch.float32)
                    for j in range(shape[0]):
                        qj, sj = quantize(region(param, index + (j,)).to(device), qc.format)
                        q[j], s[j] = qj.cpu(), sj.cpu()
                else:
                    q, s = (t.cpu() for t in quantize(region(param, index).to(device), qc.format))
                done[key] = (q, s)
            out = done[key][part]
            if part == 1:
                del done[key]
            return out

        sources = []
        for param, shape in shapes.items():
            stored_dtype = sr._stored_dtype(param)
            if param not in qnames:
                for p in pieces(param, shape, dialect):
                    sources.append(Source(p.name, p.shape, stored_dtype,
                                          lambda param=param, index=p.index: region(param, index)))
                continue
            for p in pieces(param, shape, dialect):
                args = (param, p.index, p.shape)
                sources.append(Source(p.name, p.shape, storage_dtype(qc.format),
                                      lambda args=args: quantized(*args, 0)))
                sources.append(Source(scale_name(p.name), p.shape[:-1], torch.float32,
                                      lambda args=args: quantized(*args, 1)))
        return write_checkpoint(dst, hf_config, sources, max_shard_size,
                                extras=lambda folder: copy_tokenizer_files(src, folder))
