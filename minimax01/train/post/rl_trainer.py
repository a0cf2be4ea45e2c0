"""`train.objective = "grpo"`: online RL in the ordinary trainer loop. One optimizer step is one
minibatch of a rollout batch: when none is left, the next `next_batch` generates one (prompts ->
groups of `group_size` completions from the in-process engine -> verifier rewards -> group
advantages, pass-rate filtering, balancing -> the rollout policy's and the reference's token
log-probs), split into `train.rl.minibatches` minibatches (so from the second one on the ratio
to the rollout policy differs from 1 and clipping matters). After every optimizer step the new
weights go to the engine in memory (rollout.py). Each rank generates for its own prompts.

Per logged step: reward, response_length, kept_groups (the share of groups the pass-rate filter
kept), kl (the k3 estimate against the reference, when there is one), clip_frac, drop_frac (the
paper's ratio clipping), ratio, time_generate_s and time_train_s (means per step); held-out:
eval_reward (greedy decoding of train.rl.eval_prompts prompts).

A resume regenerates from the saved rollout-batch counter: minibatches left of a batch cut by a
checkpoint are not replayed. Context and expert parallelism are refused (the engine holds the
full weights on every rank); FSDP data parallelism works."""

from __future__ import annotations

import time

import torch

from ..data.packing import IGNORE_INDEX
from ..trainer import Trainer
from .grpo import aggregate, balance_advantages, group_advantages, grpo_token_loss, pass_rate_keep
from .logprobs import batch_logprobs
from .prompts import PromptSet
from .reference import frozen_reference
from .rollout import greedy, rollout_engine, sample_groups, sync_weights
from .verifier import load_verifier, score


class RolloutData:
    """The trainer's data for GRPO (the TrainData interface); `fill(counter)` (the trainer's)
    returns the minibatches of rollout batch `counter`."""

    def __init__(self, cfg, tokenizer, dp_rank: int, dp_size: int):
        rl = cfg.train.rl
        if rl.prompts_per_step % dp_size:
            raise ValueError(f"train.rl.prompts_per_step={rl.prompts_per_step} must be a "
                             f"multiple of the data-parallel size {dp_size}")
        self.prompts = PromptSet(rl.prompts, tokenizer, cfg.train.seed, cfg.data.add_bos,
                                 cfg.data.eval_fraction)
        self.local = rl.prompts_per_step // dp_size
        self.first = dp_rank * self.local
        self.shards = [rl.prompts]
        self.counter = 0
        self.buffer: list[dict] = []
        self.fill = None

    def next_batch(self) -> dict:
        if not self.buffer:
            self.buffer = self.fill(self.counter)
            self.counter += 1
        return self.buffer.pop(0)

    def state_dict(self) -> dict:
        return {"rollout_batches": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.counter, self.buffer = int(state["rollout_batches"]), []

    def check(self) -> None:
        pass

    def eval_batches(self, num_batches: int) -> list:
        return []


class GRPOTrainer(Trainer):
    def __init__(self, cfg, world=None, init=None):
        p = cfg.parallel
        if p.cp > 1 or p.ep > 1:
            raise ValueError("train.objective grpo: parallel.cp and parallel.ep must be 1 (the "
                             "rollout engine holds the full weights on every rank); use "
                             "parallel.dp_shard for data parallelism")
        if cfg.train.lora.rank:
            raise ValueError("train.objective grpo: train.lora.rank must be 0 (the rollout "
                             "engine runs plain weights; train the full model, or merge first)")
        self.verifier = load_verifier(cfg.train.rl.verifier)
        super().__init__(cfg, world, init)
        self.engine = self.reference = self.policy = None
        self._stale = True  # the engine's weights are older than the policy's
        self._gen_seconds = 0.0

    def make_data(self, pad: int):
        self.pad = pad
        return RolloutData(self.cfg, self.tokenizer, self.world.dp_rank, self.world.dp_size)

    def prepare(self, model) -> None:
        rl = self.cfg.train.rl
        self.policy = model
        slots = min(max(rl.group_size * self.data.local, self.data.prompts.num_eval(
            -(-rl.eval_prompts // self.world.dp_size))), 512)
        self.engine = rollout_engine(model, self.model_cfg, self.world.device, self.tokenizer,
                                     self.cfg.train.seq_len, max(slots, 1))
        self._stale = False
        if rl.kl != "none" and rl.kl_coef > 0:
            self.reference = frozen_reference(self)
        self.data.fill = self._fill

    def _engine(self):
        if self._stale:
            sync_weights(self.policy, self.engine.model)
            self._stale = False
        return self.engine

    # ------------------------------------------------------------------ rollouts
    def _prompt(self, which: str, index: int):
        text, ids, answer = self.data.prompts.get(which, index)
        room = self.cfg.train.seq_len - self.cfg.train.rl.max_new_tokens
        if len(ids) > room:
            raise ValueError(f"train.rl.prompts: {which} prompt {index} has {len(ids)} tokens; "
                             f"train.seq_len - train.rl.max_new_tokens allows {room}")
        return text, ids, answer

    def _fill(self, counter: int) -> list[dict]:
        rl, t = self.cfg.train.rl, self.cfg.train
        start = time.perf_counter()
        engine = self._engine()
        base = counter * rl.prompts_per_step + self.data.first
        prompts = [self._prompt("train", base + i) for i in range(self.data.local)]
        groups = sample_groups(engine, [p[1] for p in prompts], rl.group_size,
                               max_tokens=rl.max_new_tokens, temperature=rl.temperature,
                               top_p=rl.top_p, seed=t.seed * 1_000_000_007 + base * rl.group_size)
        if self.world.device.type == "cuda":
            torch.cuda.synchronize(self.world.device)
        self._gen_seconds += time.perf_counter() - start
        eos = self.tokenizer.eos_id
        rewards, seqs = [], []
        for (text, ids, answer), group in zip(prompts, groups):
            row = []
            for c in group:
                response = list(c.token_ids) + ([eos] if c.finish_reason == "stop"
                                                and eos is not None else [])
                row.append(score(self.verifier, text, self.tokenizer.decode(c.token_ids), answer))
                seqs.append((ids, response))
            rewards.append(row)
        r = torch.tensor(rewards, dtype=torch.float64)
        adv = group_advantages(r, rl.adv_std)
        keep = pass_rate_keep(r, *rl.pass_rate)
        lengths = torch.tensor([len(s[1]) for s in seqs], dtype=torch.float64)
        kept = keep.repeat_interleave(rl.group_size)
        adv = adv.reshape(-1)
        if rl.balance and bool(kept.any()):
            adv[kept] = balance_advantages(adv[kept], lengths[kept])
        stats = {"reward": (r.sum(), r.numel()), "response_length": (lengths.sum(), len(seqs)),
                 "kept_groups": (keep.sum(), len(keep)),
                 "pass_rate": ((r > 0).sum(), r.numel())}
        chosen = [i for i in range(len(seqs)) if kept[i]]
        per = -(-len(prompts) // rl.minibatches) * rl.group_size
        batches = []
        for m in range(rl.minibatches):
            part = [i for i in chosen if m * per <= i < (m + 1) * per]
            batch = self._pack([seqs[i] for i in part], adv[part] if part else adv[:0])
            batch["rollout_stats"] = stats if m == 0 else {}
            batches.append(batch)
        return batches

    @torch.no_grad()
    def _pack(self, seqs: list, adv: torch.Tensor) -> dict:
        """Sequences -> a training batch with the rollout policy's (and the reference's)
        log-probs of every response token. On CUDA one packed row (cu_seqlens: the varlen
        kernels skip nothing); elsewhere a right-padded [S, T] batch (causal attention never
        sees the padding, and the CPU lightning path is vectorised over rows, not documents)."""
        rows = []
        for k, (prompt, response) in enumerate(seqs):
            tokens = prompt + response
            n, p = len(tokens), len(prompt)
            learn = [p <= i + 1 < n for i in range(n)]
            targets = [tokens[i + 1] if m else IGNORE_INDEX for i, m in enumerate(learn)]
            rows.append((tokens, targets,
                         [k if m else -1 for m in learn],
                         [float(adv[k]) if m else 0.0 for m in learn]))
        if not rows:  # every group filtered out: one pad token, nothing to learn
            rows = [([self.pad], [IGNORE_INDEX], [-1], [0.0])]
        dev = self.world.device
        if dev.type == "cuda":
            cols = [sum((r[i] for r in rows), []) for i in range(4)]
            cu = [0]
            for r in rows:
                cu.append(cu[-1] + len(r[0]))
            batch = {"cu_seqlens": torch.tensor(cu, dtype=torch.int32, device=dev)}
            cols = [[c] for c in cols]
        else:
            width = max(len(r[0]) for r in rows)
            pad = (self.pad, IGNORE_INDEX, -1, 0.0)
            cols = [[r[i] + [pad[i]] * (width - len(r[i])) for r in rows] for i in range(4)]
            batch = {}
        for name, col in zip(("input_ids", "labels", "seq_index", "adv"), cols):
            batch[name] = torch.tensor(col, device=dev)
        batch["num_sequences"] = len(seqs)
        batch["old_logp"] = self._logp(self.policy, batch)
        if self.reference is not None:
            batch["ref_logp"] = self._logp(self.reference, batch)
        return batch

    def _logp(self, model, batch: dict, want_out: bool = False):
        """Flat [N] log-probs of the batch's labels (and the model output)."""
        with self._autocast():
            out, lp = batch_logprobs(model, batch, self.cfg.train.loss_chunk_size)
        return (out, lp) if want_out else lp

    # ------------------------------------------------------------------ the loss
    def _count(self, batch: dict) -> int:
        if self.cfg.train.rl.aggregate == "token":
            return int((batch["seq_index"] >= 0).sum())
        return batch["num_sequences"]

    def _forward(self, model, batch: dict):
        rl = self.cfg.train.rl
        out, logp = self._logp(model, batch, want_out=True)
        seq_index = batch["seq_index"].reshape(-1)
        mask = seq_index >= 0
        ref = batch.get("ref_logp")
        loss, st = grpo_token_loss(logp[None], batch["old_logp"][None],
                                   batch["adv"].reshape(1, -1),
                                   mask[None], clip=rl.clip, clip_low=rl.clip_low,
                                   clip_high=rl.clip_high, ratio_drop=rl.ratio_drop,
                                   ref_logp=None if ref is None else ref[None], kl=rl.kl,
                                   kl_coef=rl.kl_coef)
        total, n = aggregate(loss[0], seq_index, batch["num_sequences"], rl.aggregate)
        tokens = st["tokens"]
        self._metrics = {"clip_frac": (st["clipped"], tokens), "drop_frac": (st["dropped"], tokens),
                         "ratio": (st["ratio"], tokens)}
        if ref is not None:
            self._metrics["kl"] = (st["kl"].detach(), tokens)
        self._metrics.update(batch.get("rollout_stats", {}))
        return out, total, torch.as_tensor(n, device=total.device)

    def _step(self, model, raw_model, optimizer, micro, lr, acc, params, max_norm):
        start, self._gen_seconds = time.perf_counter(), 0.0
        done = super()._step(model, raw_model, optimizer, micro, lr, acc, params, max_norm)
        self._stale = True
        if done is not None:
            total = time.perf_counter() - start
            acc.add_extra("time_generate_s", self._gen_seconds, 1)
            acc.add_extra("time_train_s", total - self._gen_seconds, 1)
        return done

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model) -> dict | None:
        """Mean reward of greedy completions of the held-out prompts (split over the ranks)."""
        rl = self.cfg.train.rl
        n = self.data.prompts.num_eval(rl.eval_prompts)
        if n == 0 or self.engine is None:
            return None
        mine = list(range(self.world.dp_rank, n, self.world.dp_size))
        prompts = [self._prompt("eval", i) for i in mine]
        outs = greedy(self._engine(), [p[1] for p in prompts], rl.max_new_tokens) if prompts else []
        total = sum(score(self.verifier, p[0], self.tokenizer.decode(c.token_ids), p[2])
                    for p, c in zip(prompts, outs))
        sums = self._reduce(torch.tensor([total, len(prompts)], dtype=torch.float64,
                                         device=self.world.device))
        return {"eval_reward": float(sums[0] / sums[1].clamp(min=1))}
