"""The training loop.

One optimizer step = `micro` micro-batches (the batch-size warm-up may lower it) of
`train.batch_size` rows x `train.seq_len` tokens, summed over data-parallel ranks. The lm loss of a
step is the mean over every target token of the global batch, whatever the layout: each
micro-batch contributes its token sum divided by the global token count. Parallelism is reached
only through the `World` (LocalWorld in one process); logging, exports and samples happen on the
main rank."""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..dtypes import torch_dtype
from ..hf_config import preferred_dialect
from ..model import MiniMaxForCausalLM
from ..parallel import checkpoint as dcp_checkpoint
from ..parallel.parallelize import parallelize
from ..tokenizer import load_tokenizer
from . import checkpointing as ckpt
from .config import RunConfig
from .config_io import to_toml
from .data import IGNORE_INDEX, TrainData
from .metrics import (IntervalStats, MetricsLogger, datasheet_peak_flops, memory_gib, summary,
                      truncate_metrics)
from .optim import build_optimizer, lr_at, micro_batches_at, set_lr
from .precision import StepCastWeights
from .recompute import apply_recompute
from .preflight import check_device, check_out_dir

class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    step: int
    tokens: int
    loss: float | None = None          # lm loss of the last logged interval
    eval_loss: float | None = None     # the last held-out loss
    checkpoint: Path | None = None
    export: Path | None = None
    sample: str | None = None
    stopped_by_signal: int | None = None


def make_world(cfg: RunConfig):
    """LocalWorld in one process; the distributed world under torchrun (WORLD_SIZE > 1)."""
    from ..parallel.world import make_world as _make_world

    check_device(cfg.train.device)
    return _make_world(cfg.parallel, None if cfg.train.device == "auto" else cfg.train.device)


class Trainer:
    """`Trainer(cfg).fit()`. Everything that can be wrong with the config or the data is
    checked in the constructor, before anything is written."""

    def __init__(self, cfg: RunConfig, world=None, init=None):
        self.cfg = cfg
        self.init = init  # init(model, optimizer) when not resuming (train/stages.py)
        self.model_cfg = cfg.validate()
        if cfg.train.stages:  # one Trainer per stage, never the stages' base config itself
            raise ValueError("train.stages is set: a staged run goes through "
                             "minimax01.train.stages.run_stages (the train command does this)")
        self.world = world if world is not None else make_world(cfg)
        spec = cfg.data.tokenizer
        if spec == "byte" and cfg.train.init_from:  # fine-tuning: the checkpoint's tokenizer
            spec = cfg.train.init_from
        try:
            self.tokenizer = load_tokenizer(None if spec == "byte" else spec)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as e:  # the tokenizers library raises bare Exceptions for bad files
            raise ValueError(f"data.tokenizer {spec}: cannot read it ({e})") from None
        if self.tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise ValueError(f"the tokenizer {spec!r} has {self.tokenizer.vocab_size} ids but "
                             f"model.vocab_size is {self.model_cfg.vocab_size}")
        pad = self.tokenizer.pad_id
        if pad is None:
            pad = self.model_cfg.pad_token_id if self.model_cfg.pad_token_id is not None else 0
        self.data = self.make_data(pad)
        self.out_dir = Path(cfg.train.out_dir)
        check_out_dir(self.out_dir)
        self.resume_from, self.damaged = ckpt.find_resumable(self.out_dir, self.world)
        if self.world.is_main:
            for path, why in self.damaged:
                ckpt.warn(f"checkpoint {path} is damaged ({why}); it is moved aside to "
                          f"{ckpt.DAMAGED}{path.name} and the run resumes from "
                          f"{self.resume_from.name}")
        if self.resume_from is not None:
            diffs = ckpt.incompatibilities(ckpt.read_state(self.resume_from), self._identity())
            if diffs:
                raise ValueError(f"cannot resume from {self.resume_from}: the config differs in "
                                 f"{'; '.join(diffs[:3])}{' ...' if len(diffs) > 3 else ''}. "
                                 f"Use another train.out_dir, or the checkpoint's settings")
        self.data.check()
        self.eval_set = self.data.eval_batches(cfg.train.eval_batches)
        self._signal: int | None = None
        self.cast: StepCastWeights | None = None  # train.cast_weights = per_step (fit sets it)
        self._saving = False
        self._log: MetricsLogger | None = None
        self._evaluated_at: int | None = None  # the last step whose held-out loss was logged
        self._metrics: dict = {}  # name -> (sum, count) of the last forward (post-training)

    def make_data(self, pad: int):
        """This rank's data (post-training trainers read their own formats)."""
        return TrainData(self.cfg, self.tokenizer, self.world.dp_rank, self.world.dp_size, pad)

    def prepare(self, model) -> None:
        """After the weights are in place (initialised, loaded or resumed), before the first
        step: where a post-training objective builds its reference model or rollout engine."""

    def _count(self, batch: dict) -> torch.Tensor:
        """What this micro-batch's loss sum is divided by, globally: its target tokens."""
        return batch["labels"].ne(IGNORE_INDEX).sum()

    def _identity(self) -> dict:
        return {"config": self.cfg.to_dict(), "model_config": self.model_cfg.to_dict()}

    # ------------------------------------------------------------------ setup
    def build_model(self) -> MiniMaxForCausalLM:
        t = self.cfg.train
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        # from a checkpoint: built on the meta device, each rank's part read after parallelize
        with torch.device("meta" if t.init_from else self.world.device):
            model = MiniMaxForCausalLM(self.model_cfg)
        model.float()  # fp32 master weights; autocast does the low-precision math
        if t.lora.rank:  # only the adapters train; the frozen matrices need no fp32 master
            from .lora import apply_lora, cast_frozen

            apply_lora(model, t.lora.rank, t.lora.alpha, t.lora.targets, seed=t.seed)
            cast_frozen(model, torch_dtype(t.dtype))
        apply_recompute(model, "full" if t.activation_checkpointing else t.recompute)
        if t.compile:
            for layer in model.model.layers:
                layer.compile()
        return model

    def _init_from(self, model, resumed: bool) -> None:
        """Give the meta model this rank's storage: the checkpoint's weights (train.init_from),
        or nothing yet when resuming (the training checkpoint fills it)."""
        from ..checkpoint.hf import _materialize_buffers
        from .init_from import fill_from_checkpoint
        from .lora import reset_lora

        t = self.cfg.train
        if resumed:
            model.to_empty(device=self.world.device)
            _materialize_buffers(model, self.world.device)
            return
        fill_from_checkpoint(model, t.init_from, self.world.device)
        if t.lora.rank:
            reset_lora(model, t.seed)

    def _batch_to_device(self, batch: dict) -> dict:
        dev = self.world.device
        out = {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v)
               for k, v in batch.items()}
        out["shift_labels"] = False  # the packer's labels are next-token targets already
        return self.world.shard_batch(out)

    def _forward(self, model, batch: dict):
        kwargs = {}
        if self.cfg.train.loss_chunk_size:
            kwargs["loss_chunk_size"] = self.cfg.train.loss_chunk_size
        with self._autocast():
            out = model(batch["input_ids"], labels=batch["labels"],
                        cu_seqlens=batch.get("cu_seqlens"), shift_labels=False,
                        position_ids=batch.get("position_ids"), **kwargs)
        n = batch["labels"].ne(IGNORE_INDEX).sum()
        # token sum of the lm loss; 0 (with zero gradients) for a micro-batch with no targets
        lm_sum = torch.where(n > 0, out.lm_loss, torch.zeros_like(out.lm_loss)) * n
        return out, lm_sum, n

    def _autocast(self):
        dtype = torch_dtype(self.cfg.train.dtype)
        return torch.autocast(self.world.device.type, dtype=dtype,
                              enabled=dtype != torch.float32)

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.world.world_size == 1 else self.world.all_reduce(values, "sum")

    # ------------------------------------------------------------------ pieces of a run
    @torch.no_grad()
    def evaluate(self, model) -> float | None:
        """Mean lm loss over the fixed held-out batches (None without a held-out split)."""
        if not self.eval_set:
            return None
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.world.device)
        try:
            for batch in self.eval_set:
                _, lm_sum, n = self._forward(model, self._batch_to_device(batch))
                total += torch.stack([lm_sum.double(), n.double()])
        finally:
            model.train()
        total = self._reduce(total)
        return float(total[0] / total[1].clamp(min=1))

    def save(self, model, optimizer, step: int, tokens: int) -> Path:
        """Checkpoint `step`; a state that is not finite is never saved (TrainingDiverged)."""
        state = {"step": step, "tokens": tokens, "data": self.data.state_dict(),
                 "metrics_lines": self._log.lines if self._log is not None else None,
                 "evaluated_at": self._evaluated_at,
                 "version": __version__, "time": time.time(), **self._identity()}
        self._saving = True
        try:
            return ckpt.save_checkpoint(self.out_dir, step, model, optimizer, state, self.world,
                                        self.cfg.train.keep_last)
        except ckpt.NonFiniteState as e:
            last = ckpt.latest_checkpoint(self.out_dir)
            raise TrainingDiverged(f"{e}: not saved as a checkpoint. The last good checkpoint "
                                   f"is {last if last else 'none'}; lower optim.lr or raise "
                                   f"optim.warmup_steps and re-run to resume") from None
        finally:
            self._saving = False

    def export(self, model, log: MetricsLogger) -> tuple[Path | None, str | None]:
        """HF-format export to out_dir/model (written aside, then renamed) with the tokenizer,
        in the model config's dtype; then the sample, generated by the exported model."""
        t = self.cfg.train
        if not (t.export or t.sample_tokens):
            return None, None
        state = dcp_checkpoint.full_state_dict(model)  # every rank takes part; gathered on CPU
        path = sample = None
        if self.world.is_main and t.lora.rank:  # merge-and-export: the released layout
            from .lora import merge_state_dict

            state = merge_state_dict(state, t.lora.alpha / t.lora.rank)
        if self.world.is_main:
            dtype = torch_dtype(self.model_cfg.dtype)
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            if t.export:
                path = self._write_export(state)
                log.print(f"exported the model to {path}")
            if t.sample_tokens:
                if path is not None:
                    final = MiniMaxForCausalLM.from_pretrained(path, device=self.world.device)
                else:
                    final = MiniMaxForCausalLM(self.model_cfg).to(dtype)
                    final.load_state_dict(state)
                sample = self.sample(final)
        self.world.barrier()
        return path, sample

    def _write_export(self, state: dict) -> Path:
        """out_dir/model: the save commits atomically (a kill leaves the old export or the new)."""
        from ..checkpoint.hf import save_state_dict

        final = self.out_dir / "model"
        # legacy (the official layout) unless the model has layers only the hf dialect can say
        save_state_dict(state, self.model_cfg, final, preferred_dialect(self.model_cfg),
                        tokenizer=self.tokenizer)
        return final

    def sample(self, model) -> str:
        from ..infer.generate import generate

        t = self.cfg.train
        device = self.world.device
        model = model.to(device)
        prompt = self.tokenizer.encode(t.sample_prompt, add_bos=self.cfg.data.add_bos)
        stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else None
        out = generate(model, [prompt], max_new_tokens=t.sample_tokens, temperature=0.7,
                       top_k=40, seed=t.seed, stop_tokens=stops)
        return t.sample_prompt + self.tokenizer.decode(out[0, len(prompt):].tolist())

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        """The first SIGTERM / SIGINT stops the run at the next micro-batch boundary (with a
        checkpoint); a second one stops at once, except during a save, which is let finish."""
        if self._signal is not None and not self._saving:
            raise KeyboardInterrupt
        self._signal = self._signal or signum

    def _stop_requested(self) -> bool:
        """Whether any rank got a signal (every rank takes part: they stop together)."""
        stop = self._signal is not None
        if self.world.world_size > 1:
            flag = torch.tensor(float(stop), device=self.world.device)
            stop = bool(self.world.all_reduce(flag, "max"))
        return stop

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        cfg, world, t = self.cfg, self.world, self.cfg.train
        if world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.out_dir)
            (self.out_dir / "config.toml").write_text(to_toml(cfg))
        if world.is_main:
            for path, _ in self.damaged:
                ckpt.set_aside(path)
        world.barrier()
        model = self.build_model()
        raw_model = model
        model = parallelize(model, world, cfg.parallel)
        if t.init_from:  # storage for this rank's part, filled unless a checkpoint will be
            self._init_from(model, resumed=self.resume_from is not None)
        optimizer = build_optimizer(model, cfg.optim)
        self.cast = None
        if t.cast_weights == "per_step":
            if world.mesh is not None:
                raise ValueError("train.cast_weights = per_step is for one process; under FSDP "
                                 "set parallel.param_dtype = bfloat16")
            self.cast = StepCastWeights(model, torch_dtype(t.dtype))
        step = tokens = 0
        lines = 0
        if self.resume_from is not None:
            state = ckpt.load_checkpoint(self.resume_from, model, optimizer, world, verified=True)
            step, tokens = int(state["step"]), int(state["tokens"])
            self.data.load_state_dict(state["data"])
            lines = state.get("metrics_lines")
            self._evaluated_at = state.get("evaluated_at")
        elif self.init is not None:
            self.init(model, optimizer)
        self.prepare(model)
        if world.is_main:
            lines = truncate_metrics(self.out_dir / "metrics.jsonl", lines, step)
        log = MetricsLogger(self.out_dir, world.is_main, t.steps, min(step, t.steps), t.progress,
                            t.tensorboard, lines=lines or 0)
        self._log = log
        self._announce(log, step)
        old_handlers = self._install_signals()
        try:
            return self._loop(model, raw_model, optimizer, log, step, tokens)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            log.close()

    def _announce(self, log: MetricsLogger, step: int) -> None:
        m, t = self.model_cfg, self.cfg.train
        total = m.num_parameters() / 1e6
        active = m.num_parameters(active=True) / 1e6
        log.print(f"model: {m.num_hidden_layers} layers, {total:.2f}M parameters ({active:.2f}M "
                  f"active); data: {self.cfg.data.source} ({len(self.data.shards)} shard(s)); "
                  f"{t.steps} steps of {t.batch_size}x{t.seq_len} tokens x {t.grad_accum}; "
                  f"device {self.world.device}; out_dir {self.out_dir}")
        if self.resume_from is not None:
            log.print(f"resuming from {self.resume_from} (step {step})")

    def _loop(self, model, raw_model, optimizer, log, step, tokens) -> TrainResult:
        cfg, world, t, dev = self.cfg, self.world, self.cfg.train, self.world.device
        params = [p for p in model.parameters() if p.requires_grad]
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        peak = datasheet_peak_flops(dev)
        flops_tok = self.model_cfg.flops_per_token(t.seq_len, training=True)
        result = TrainResult(step=step, tokens=tokens, checkpoint=self.resume_from)
        saved_at = step if self.resume_from is not None else None
        bad = 0
        acc = IntervalStats(len(raw_model.model.layers), self.model_cfg.num_local_experts, dev)
        if step == 0 and t.eval_every:  # where the loss starts from
            result.eval_loss = self._log_eval(model, log, 0)
        clock = time.perf_counter()

        while step < t.steps:
            micro = micro_batches_at(tokens, t.grad_accum, cfg.optim.batch_warmup_tokens)
            lr = lr_at(step, t.steps, cfg.optim)
            done = self._step(model, raw_model, optimizer, micro, lr, acc, params, max_norm)
            if done is None:  # a signal between micro-batches: the step was not taken
                return self._stop(model, optimizer, log, result, step, tokens, saved_at)
            sums, n_global, grad_norm, finite = done
            step += 1
            tokens += micro * t.batch_size * t.seq_len
            if finite:
                bad = 0
                acc.add_step(sums[0], n_global, sums[1], grad_norm, micro * t.batch_size * t.seq_len)
            else:
                bad += 1
                acc.skipped += 1
                why = "loss" if not bool(torch.isfinite(sums).all()) else "gradient"
                log.record({"step": step, "event": "skipped", "reason": f"non-finite {why}"})
                log.print(f"step {step}: non-finite {why}; step skipped ({bad} in a row)")
                if bad >= t.max_bad_steps:
                    last = ckpt.latest_checkpoint(self.out_dir)
                    raise TrainingDiverged(
                        f"{bad} steps in a row had a non-finite loss or gradient (the last at "
                        f"step {step}); stopping. The last good checkpoint is "
                        f"{last if last else 'none (nothing was saved yet)'}: lower optim.lr "
                        f"or raise optim.warmup_steps and re-run the same command to resume")
            log.advance()

            if step % t.log_every == 0 or step == t.steps:
                elapsed = time.perf_counter() - clock
                record = acc.record(step, lr, tokens, elapsed, world, self._reduce)
                if record is not None:
                    if peak:
                        record["mfu"] = record["tokens_per_s"] * flops_tok / (peak * world.world_size)
                    record["memory_gib"] = round(memory_gib(dev), 3)
                    log.record(record)
                    result.loss = record["loss"]
                    log.show(summary(record), step, t.steps)
                acc = IntervalStats(len(raw_model.model.layers), self.model_cfg.num_local_experts, dev)
                clock = time.perf_counter()

            pause = time.perf_counter()
            last = step == t.steps  # evaluated, then saved, after the loop
            if t.eval_every and step % t.eval_every == 0 and not last:
                result.eval_loss = self._log_eval(model, log, step)
            if t.save_every and step % t.save_every == 0 and bad == 0 and not last:
                result.checkpoint = self.save(model, optimizer, step, tokens)  # never mid-divergence
                saved_at = step
            if self._stop_requested():  # every rank stops at the same step
                return self._stop(model, optimizer, log, result, step, tokens, saved_at)
            clock += time.perf_counter() - pause  # evaluation and saving do not count as training

        # the final evaluation comes before the final checkpoint, so that the checkpoint's count
        # of metrics records includes it (a resume never logs it twice, nor loses it)
        if self._evaluated_at != step:
            result.eval_loss = self._log_eval(model, log, step)
        if saved_at != step:
            result.checkpoint = self.save(model, optimizer, step, tokens)
        if self._stop_requested():  # saved: skip the export and the sample
            return self._stop(model, optimizer, log, result, step, tokens, step)
        result.export, result.sample = self.export(model, log)
        if result.sample is not None:
            log.print(f"sample:\n{result.sample}")
        result.step, result.tokens = step, tokens
        return result

    def _stop(self, model, optimizer, log, result, step, tokens, saved_at) -> TrainResult:
        """Stop on a signal: checkpoint `step` (unless saved, or nothing was trained yet)."""
        if saved_at != step and step > 0:
            result.checkpoint = self.save(model, optimizer, step, tokens)
        name = signal.Signals(self._signal).name if self._signal else "a signal"
        log.print(f"stopped by {name} at step {step}; checkpoint {result.checkpoint}. "
                  f"Re-run the same command to resume.")
        result.step, result.tokens = step, tokens
        result.stopped_by_signal = self._signal or signal.SIGTERM
        return result

    def _step(self, model, raw_model, optimizer, micro: int, lr: float, acc, params, max_norm):
        """One optimizer step over `micro` micro-batches. Each backpropagates the world's
        `loss_scale.rank_loss` (its lm-loss token sum over the global target count, its aux
        loss over `micro`, scaled as parallel/scaling.py says). Returns the global
        [lm sum, aux mean], the global target count, the gradient norm, and whether the step
        was finite (else it is skipped); None if a signal came between two micro-batches
        (then nothing is stepped, and the data position is put back to the step's start)."""
        world, dev = self.world, self.world.device
        data_before = self.data.state_dict()
        batches = [self._batch_to_device(self.data.next_batch()) for _ in range(micro)]
        counts = torch.stack([torch.as_tensor(self._count(b), device=dev) for b in batches])
        n_global = self._reduce(counts.sum().double()).clamp(min=1)
        set_lr(optimizer, lr)
        scale = world.loss_scale
        totals = torch.zeros(2, dtype=torch.float64, device=dev)
        if self.cast is not None:  # low-precision weights for this step's micro-batches
            self.cast.begin()
        try:
            for k, batch in enumerate(batches):
                if k and self._stop_requested():
                    if self.cast is not None:
                        self.cast.end()
                    optimizer.zero_grad(set_to_none=True)
                    self.data.load_state_dict(data_before)
                    return None
                out, lm_sum, _ = self._forward(model, batch)
                acc.add_moe(raw_model.moe_stats())
                for name, (value, count) in self._metrics.items():
                    acc.add_extra(name, value, count)
                self._metrics = {}
                scale.rank_loss(lm_sum, n_global, out.aux_loss, micro).backward()
                totals += torch.stack([lm_sum.detach(), out.aux_loss.detach() / micro]).double()
        finally:
            if self.cast is not None:  # fp32 masters (and fp32 grads) back in place
                self.cast.end()
        sums = world.all_reduce(totals, "sum")
        sums[1] = scale.mean_aux(sums[1])
        grad_norm = world.clip_grad_norm_(params, max_norm)
        finite = bool(torch.isfinite(sums).all() and torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sums, n_global, grad_norm, finite

    def _log_eval(self, model, log: MetricsLogger, step: int) -> float | None:
        self._evaluated_at = step
        result = self.evaluate(model)  # the held-out loss, or a dict of held-out numbers
        extra = result if isinstance(result, dict) else {"eval_loss": result}
        loss = extra.get("eval_loss")
        if any(v is not None for v in extra.values()):
            log.record({"step": step, **extra})
            log.print(f"step {step}: " + ", ".join(f"held-out {k.removeprefix('eval_')} {v:.4f}"
                                                   for k, v in extra.items() if v is not None))
        return loss
