"""Training MiniMax-VL-01 (`train` with a VL model preset, e.g. `train --preset vl-demo`):
image-text chats packed with their image tokens (train/data/vl_data.py), the loss on the
answers only, and the freeze policies of the paper's stages (VL01.md §9):

    train.freeze = "stage1"     I   modality alignment: vision tower + projector train, the LLM
                                    is frozen (the paper: "LLM not updated"; 336 px images)
    train.freeze = "stage2"     II  vision-understanding enhancement: all parameters
    train.freeze = "stage3"     III user-experience enhancement: all parameters
    (stage IV is DPO on preference pairs: not implemented here; refused with a clear line)

or a comma-separated list of the parts to freeze: `vision_tower`, `projector` (the projector
and `image_newline`), `language_model`. Frozen parameters get requires_grad=False and are not
given to the optimizer.

It runs in one process (CPU or one GPU) with the text trainer's optimizer and schedules
(train/optim.py); the model is exported in the released layout (save_pretrained) with its
tokenizer, so `serve --checkpoint OUT_DIR/model` serves it with images. With the synthetic
images (data.source = "synthetic_images") the held-out accuracy per task is measured before and
after training, by greedy answers through the serving engine."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RunConfig

PARTS = {"vision_tower": ("vision_tower",), "projector": ("multi_modal_projector", "image_newline"),
         "language_model": ("language_model",)}
STAGES = {"stage1": ("language_model",), "stage2": (), "stage3": ()}
SYNTHETIC = "synthetic_images"
EVAL_SEED = 10_007         # held-out synthetic images: another seed, never trained on


@dataclass
class VLResult:
    step: int
    loss: float | None = None
    accuracy_before: dict = field(default_factory=dict)
    accuracy_after: dict = field(default_factory=dict)
    export: Path | None = None
    model: object = None           # the trained MiniMaxVLForConditionalGeneration


def is_vl_run(cfg: RunConfig) -> bool:
    return cfg.model.is_vl


def frozen_parts(spec: str) -> tuple[str, ...]:
    """train.freeze -> the parts to freeze (ValueError naming the key for a bad value)."""
    spec = (spec or "").strip()
    if spec in STAGES:
        return STAGES[spec]
    if spec in ("stage4", "preference"):
        raise ValueError("train.freeze: stage IV (preference, DPO) is not implemented")
    parts = tuple(p.strip() for p in spec.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"train.freeze: unknown part(s) {', '.join(bad)}; give "
                         f"{', '.join(PARTS)} (comma-separated) or a stage: "
                         f"{', '.join(STAGES)}")
    if set(parts) == set(PARTS):
        raise ValueError("train.freeze: every part is frozen, nothing would train")
    return parts


def apply_freeze(model, parts) -> dict[str, int]:
    """requires_grad=False on the frozen parts; returns trainable parameters per part."""
    out = {}
    for name, attrs in PARTS.items():
        params = []
        for attr in attrs:
            mod = getattr(model, attr)
            params += [mod] if isinstance(mod, torch.nn.Parameter) else list(mod.parameters())
        for p in params:
            p.requires_grad_(name not in parts)
        out[name] = 0 if name in parts else sum(p.numel() for p in params)
    return out


def _examples(cfg: RunConfig, tok, processor, image_token_id: int, seed: int):
    """An endless stream of VLExamples: synthetic images (seeded), or the JSONL file (epochs)."""
    from .data.synthetic_images import make_image_example
    from .data.vl_data import encode_chat, read_jsonl

    if cfg.data.source == SYNTHETIC:
        i = 0
        while True:
            ex = make_image_example(i, seed, processor.image_size)
            chat = ex.messages()
            chat[0]["content"][0] = {"type": "image", "image": ex.image}
            out = encode_chat(chat, tok, processor, image_token_id)
            out.task = ex.task
            yield out
            i += 1
    path = Path(cfg.data.source)
    if not path.is_file():
        raise ValueError(f"data.source {path}: no such file (a VL run reads a JSONL file of "
                         f"chats, or '{SYNTHETIC}')")
    while True:
        n = 0
        for what, messages, task in read_jsonl(path, cfg.data.strict):
            try:
                ex = encode_chat(messages, tok, processor, image_token_id, path.parent, what)
            except ValueError as e:
                if cfg.data.strict:
                    raise
                print(f"warning: {e}; skipped", file=sys.stderr)
                continue
            ex.task = task
            n += 1
            yield ex
        if n == 0:
            raise ValueError(f"data.source {path}: no usable chat record")


def accuracy(model, tok, examples, max_tokens: int = 14) -> dict[str, float]:
    """Exact-match accuracy of greedy answers per task (and "all"), through the serving engine:
    each prompt is its chat up to the assistant's header, the answer is what comes before
    `<end_of_sentence>`."""
    from ..infer.engine import Engine
    from ..infer.request import SamplingParams
    from ..vision.chat import EOS
    from .data.packing import IGNORE_INDEX

    prompts = []
    for ex in examples:
        k = next(i for i, t in enumerate(ex.targets) if t != IGNORE_INDEX)
        prompts.append(ex.ids[:k + 1])
    longest = max(len(p) for p in prompts) + max_tokens + 1
    engine = Engine(model, tok, num_slots=min(len(prompts), 64), max_context=longest,
                    prefill_chunk=8192)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=[EOS], ignore_eos=True)
        outs = engine.generate(prompts, params, images=[ex.images for ex in examples])
    finally:
        engine.close()
    right, total = defaultdict(int), defaultdict(int)
    for ex, out in zip(examples, outs):
        ok = out.text.split("<", 1)[0].strip() == ex.answer.strip()  # up to <end_of_sentence>
        for key in (ex.task or "all", "all") if ex.task else ("all",):
            right[key] += ok
            total[key] += 1
    return {k: right[k] / total[k] for k in sorted(total)}


def _table(before: dict, after: dict) -> str:
    lines = [f"  {'task':<10} {'before':>7} {'after':>7}"]
    for k in sorted(after, key=lambda k: (k == "all", k)):
        lines.append(f"  {k:<10} {before.get(k, 0.0):>7.1%} {after[k]:>7.1%}")
    return "\n".join(lines)


def run_vl(cfg: RunConfig, log=print) -> VLResult:
    """One process: build, freeze, train, measure, export (see the module docstring)."""
    from ..dtypes import torch_dtype
    from ..tokenizer import load_tokenizer
    from ..vision import ImageProcessor, VLConfig
    from ..vision.model import MiniMaxVLForConditionalGeneration
    from .data.vl_data import VLBatches
    from .optim import build_optimizer, lr_at, set_lr

    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("VL training runs in one process for now (see docs/vision.md)")
    t, d = cfg.train, cfg.data
    vcfg = dataclasses.replace(VLConfig.from_preset(cfg.model.preset), text_config=cfg.validate())
    if t.grad_accum != 1 or cfg.optim.batch_warmup_tokens or t.stages:
        raise ValueError("train.grad_accum, train.stages and optim.batch_warmup_tokens are not "
                         "supported for VL runs yet")
    parts = frozen_parts(t.freeze)
    device = torch.device("cuda" if t.device == "auto" and torch.cuda.is_available() else
                          "cpu" if t.device == "auto" else t.device)
    tok = load_tokenizer(None if d.tokenizer == "byte" else d.tokenizer)
    if tok.vocab_size > vcfg.text_config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model "
                         f"{vcfg.text_config.vocab_size}")
    processor = ImageProcessor.from_config(vcfg)
    image_token = vcfg.image_token_index
    torch.manual_seed(t.seed)
    with torch.device(device):
        model = MiniMaxVLForConditionalGeneration(vcfg)
    model.float()
    trainable = apply_freeze(model, parts)
    log(f"VL model {cfg.model.preset}: trainable parameters "
        + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in trainable.items())
        + (f" (frozen: {', '.join(parts)})" if parts else ""))
    pad = tok.pad_id if tok.pad_id is not None else 0
    batches = VLBatches(_examples(cfg, tok, processor, image_token, t.seed), t.batch_size,
                        t.seq_len, pad)
    held_out = []
    if d.source == SYNTHETIC and t.eval_batches:
        stream = _examples(cfg, tok, processor, image_token, EVAL_SEED + t.seed)
        held_out = [next(stream) for _ in range(t.eval_batches)]
    result = VLResult(step=0)
    if held_out:
        result.accuracy_before = accuracy(model, tok, held_out)
        log(f"held-out accuracy before training: {result.accuracy_before['all']:.1%} "
            f"({len(held_out)} images)")
    optimizer = build_optimizer(model, cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = torch_dtype(t.dtype)
    model.train()
    clock, losses = time.perf_counter(), []
    for step in range(t.steps):
        batch = batches.next_batch()
        px = processor(batch["images"]) if batch["images"] else {"pixel_values": None,
                                                                  "image_sizes": None}
        set_lr(optimizer, lr_at(step, t.steps, cfg.optim))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(batch["input_ids"].to(device), pixel_values=px["pixel_values"],
                        image_sizes=px["image_sizes"], labels=batch["labels"].to(device),
                        cu_seqlens=batch["cu_seqlens"].to(device), shift_labels=False)
        out.loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.lm_loss.detach())
        if not math.isfinite(loss):
            raise ValueError(f"step {step + 1}: the loss is not finite; lower optim.lr")
        losses.append(loss)
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            result.loss = sum(losses) / len(losses)
            log(f"step {step + 1}/{t.steps}: loss {result.loss:.4f} "
                f"({time.perf_counter() - clock:.1f} s)")
            losses = []
    result.step, result.model = t.steps, model
    model.eval()
    if held_out:
        result.accuracy_after = accuracy(model, tok, held_out)
        log(f"held-out accuracy ({len(held_out)} images, greedy exact match):\n"
            + _table(result.accuracy_before, result.accuracy_after))
    if t.export:
        result.export = Path(t.out_dir) / "model"
        model.save_pretrained(result.export, tokenizer=tok)
        log(f"exported the model to {result.export}")
    return result
