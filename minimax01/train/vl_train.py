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

It runs in one process (CPU or one GPU) or under torchrun with the text trainer's layouts,
FSDP2 data parallel and expert parallel (+ETP) over one DeviceMesh (train/vl_parallel.py says
how the tower is sharded and how each rank reads its own rows); context parallelism is
refused. The optimizer, schedules and loss scaling are the text trainer's (train/optim.py,
parallel/scaling.py); checkpoints are its too (train/checkpointing.py: `out_dir/checkpoints/`,
every `train.save_every` steps and at the end, resharded on resume onto any layout, and the
same command resumes exactly where it stopped). The model is exported in the released layout
(save_pretrained, gathered from the shards) with its tokenizer, so `serve --checkpoint
OUT_DIR/model` serves it with images. With the synthetic images (data.source =
"synthetic_images") the held-out accuracy per task is measured before and after training
(on the main rank), by greedy answers through the serving engine."""

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
    checkpoint: Path | None = None
    losses: list = field(default_factory=list)   # the global lm loss of every step run here
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


def _examples(cfg: RunConfig, tok, processor, image_token_id: int, seed: int, start: int = 0):
    """An endless stream of (record index, VLExample): synthetic images (seeded, index i is
    image i), or the JSONL file's records over and over (the index counts records over the
    epochs). Records before `start` are skipped without being decoded (a resume)."""
    from .data.synthetic_images import make_image_example
    from .data.vl_data import encode_chat, read_jsonl

    if cfg.data.source == SYNTHETIC:
        i = start
        while True:
            ex = make_image_example(i, seed, processor.image_size)
            chat = ex.messages()
            chat[0]["content"][0] = {"type": "image", "image": ex.image}
            out = encode_chat(chat, tok, processor, image_token_id)
            out.task = ex.task
            yield i, out
            i += 1
    path = Path(cfg.data.source)
    if not path.is_file():
        raise ValueError(f"data.source {path}: no such file (a VL run reads a JSONL file of "
                         f"chats, or '{SYNTHETIC}')")
    index = 0
    while True:
        n = skipped = 0
        for what, messages, task in read_jsonl(path, cfg.data.strict):
            index += 1
            if index <= start:
                skipped += 1
                continue
            try:
                ex = encode_chat(messages, tok, processor, image_token_id, path.parent, what)
            except ValueError as e:
                if cfg.data.strict:
                    raise
                print(f"warning: {e}; skipped", file=sys.stderr)
                continue
            ex.task = task
            n += 1
            yield index - 1, ex
        if n == 0 and not skipped:
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


def run_vl(cfg: RunConfig, log=print, world=None, on_backward=None) -> VLResult:
    """Build, freeze, parallelize, train (resuming from out_dir's newest checkpoint), measure,
    export (see the module docstring). `world`: default make_world(cfg) (torchrun: the
    distributed world). `on_backward(step, model)`: called on every rank after each step's
    backward, before clipping (tests read the gradients there)."""
    import torch.distributed as dist

    from .trainer import make_world
    from .vl_parallel import check_parallel

    check_parallel(cfg)
    owns = world is None and not (dist.is_available() and dist.is_initialized())
    world = world if world is not None else make_world(cfg)
    try:
        return _run(cfg, world, log if world.is_main else (lambda *a: None), on_backward)
    finally:
        if owns:
            world.shutdown()


def _identity(cfg: RunConfig, vcfg) -> dict:
    """What a resume must agree with (checkpointing.incompatibilities): the run config and
    the model, the vision tower included."""
    model = {**vcfg.text_config.to_dict(), "vision_config": dataclasses.asdict(vcfg.vision_config),
             "image_token_index": vcfg.image_token_index}
    return {"config": cfg.to_dict(), "model_config": model}


def _run(cfg: RunConfig, world, log, on_backward) -> VLResult:
    from .. import __version__
    from ..dtypes import torch_dtype
    from ..tokenizer import load_tokenizer
    from ..vision import ImageProcessor, VLConfig
    from ..vision.model import MiniMaxVLForConditionalGeneration
    from . import checkpointing as ckpt
    from .data.packing import IGNORE_INDEX
    from .optim import build_optimizer, lr_at, set_lr
    from .preflight import check_out_dir
    from .vl_parallel import (ExampleStream, RankBatches, check_layout, gather_model,
                              parallelize_vl)

    t, d = cfg.train, cfg.data
    vcfg = dataclasses.replace(VLConfig.from_preset(cfg.model.preset), text_config=cfg.validate())
    if t.grad_accum != 1 or cfg.optim.batch_warmup_tokens or t.stages:
        raise ValueError("train.grad_accum, train.stages and optim.batch_warmup_tokens are not "
                         "supported for VL runs yet")
    check_layout(cfg, world, vcfg.text_config)
    parts = frozen_parts(t.freeze)
    device = world.device
    tok = load_tokenizer(None if d.tokenizer == "byte" else d.tokenizer)
    if tok.vocab_size > vcfg.text_config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model "
                         f"{vcfg.text_config.vocab_size}")
    processor = ImageProcessor.from_config(vcfg)
    image_token = vcfg.image_token_index
    out_dir = Path(t.out_dir)
    check_out_dir(out_dir)
    resume_from, damaged = ckpt.find_resumable(out_dir, world)
    identity = _identity(cfg, vcfg)
    if resume_from is not None:
        diffs = ckpt.incompatibilities(ckpt.read_state(resume_from), identity)
        if diffs:
            raise ValueError(f"cannot resume from {resume_from}: the config differs in "
                             f"{'; '.join(diffs[:3])}{' ...' if len(diffs) > 3 else ''}. "
                             f"Use another train.out_dir, or the checkpoint's settings")
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out_dir)
        for path, why in damaged:
            ckpt.warn(f"checkpoint {path} is damaged ({why}); moved aside")
            ckpt.set_aside(path)
    world.barrier()
    torch.manual_seed(t.seed)
    with torch.device(device):
        model = MiniMaxVLForConditionalGeneration(vcfg)
    model.float()
    trainable = apply_freeze(model, parts)
    log(f"VL model {cfg.model.preset}: trainable parameters "
        + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in trainable.items())
        + (f" (frozen: {', '.join(parts)})" if parts else "")
        + (f"; {world.world_size} ranks, {world.dp_size} data-parallel, "
           f"ep {cfg.parallel.ep}" if world.mesh is not None else ""))
    pad = tok.pad_id if tok.pad_id is not None else 0
    held_out = []
    if d.source == SYNTHETIC and t.eval_batches:
        stream = _examples(cfg, tok, processor, image_token, EVAL_SEED + t.seed)
        held_out = [next(stream)[1] for _ in range(t.eval_batches)]
    result = VLResult(step=0)
    if held_out and resume_from is None and world.is_main:  # the untouched initial weights
        result.accuracy_before = accuracy(model, tok, held_out)
        log(f"held-out accuracy before training: {result.accuracy_before['all']:.1%} "
            f"({len(held_out)} images)")
    world.barrier()
    model = parallelize_vl(model, world, cfg.parallel)
    optimizer = build_optimizer(model, cfg.optim)
    step = tokens = position = 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer, world, verified=True)
        step, tokens = int(state["step"]), int(state["tokens"])
        position = int(state["data"]["position"])
        result.accuracy_before = state.get("accuracy_before") or {}
        log(f"resuming from {resume_from} (step {step})")
    stream = ExampleStream(_examples(cfg, tok, processor, image_token, t.seed, position),
                           position)
    batches = RankBatches(stream, t.batch_size, t.seq_len, pad, world.dp_rank, world.dp_size)
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = torch_dtype(t.dtype)
    scale = world.loss_scale

    def save(at: int) -> Path:
        state = {"step": at, "tokens": tokens, "data": batches.state_dict(),
                 "accuracy_before": result.accuracy_before, "version": __version__,
                 "time": time.time(), **identity}
        return ckpt.save_checkpoint(out_dir, at, model, optimizer, state, world, t.keep_last)

    model.train()
    clock, losses = time.perf_counter(), []
    while step < t.steps:
        batch = batches.next_batch()
        px = processor(batch["images"]) if batch["images"] else {"pixel_values": None,
                                                                  "image_sizes": None}
        set_lr(optimizer, lr_at(step, t.steps, cfg.optim))
        labels = batch["labels"].to(device)
        n = labels.ne(IGNORE_INDEX).sum()
        n_global = world.all_reduce(n.double(), "sum").clamp(min=1)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(batch["input_ids"].to(device), pixel_values=px["pixel_values"],
                        image_sizes=px["image_sizes"], labels=labels,
                        cu_seqlens=batch["cu_seqlens"].to(device), shift_labels=False)
        # this rank's token sum of the lm loss (0 without targets), scaled as the text trainer's
        lm_sum = torch.where(n > 0, out.lm_loss, torch.zeros_like(out.lm_loss)) * n
        scale.rank_loss(lm_sum, n_global, out.aux_loss).backward()
        if on_backward is not None:
            on_backward(step, model)
        if cfg.optim.grad_clip > 0:
            world.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(world.all_reduce(lm_sum.detach().double(), "sum") / n_global)
        if not math.isfinite(loss):
            raise ValueError(f"step {step + 1}: the loss is not finite; lower optim.lr")
        step += 1
        tokens += t.batch_size * t.seq_len
        losses.append(loss)
        result.losses.append(loss)
        if step % t.log_every == 0 or step == t.steps:
            result.loss = sum(losses) / len(losses)
            log(f"step {step}/{t.steps}: loss {result.loss:.4f} "
                f"({time.perf_counter() - clock:.1f} s)")
            losses = []
        if t.save_every and step % t.save_every == 0 and step != t.steps:
            result.checkpoint = save(step)
    if resume_from is None or step > int(ckpt.read_state(resume_from)["step"]):
        result.checkpoint = save(step)
    else:
        result.checkpoint = resume_from
    result.step = step
    model.eval()
    final = gather_model(model, world, vcfg)  # every rank; the whole model on the main rank
    if world.is_main:
        result.model = final
        if held_out:  # (synthetic runs: small models) on this rank's device
            result.accuracy_after = accuracy(final.to(device), tok, held_out)
            log(f"held-out accuracy ({len(held_out)} images, greedy exact match):\n"
                + _table(result.accuracy_before, result.accuracy_after))
        if t.export:
            result.export = out_dir / "model"
            final.save_pretrained(result.export, tokenizer=tok)
            log(f"exported the model to {result.export}")
    world.barrier()
    return result
