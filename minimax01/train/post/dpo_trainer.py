"""`train.objective = "dpo"`: the ordinary trainer loop (FSDP, EP and CP as in pre-training)
with a preference loss. A micro-batch is packed pairs (dpo_data.py); its loss sum is the sum of
its pairs' DPO losses and the step divides by the global number of pairs, so gradients are the
mean over pairs of the whole step whatever the layout.

The reference is a frozen copy of the starting weights (`train.dpo.reference = "model"`, built
like the policy: the same seed and the same `init`), or, with "precomputed", its log-probs of
every pair computed once before the first step, kept in `out_dir/reference_logps.json` (the data
file's digest and the sequence length in it; a resume reads it back) and the reference freed, so
training holds one model.

Context parallelism: a sequence's log-prob is a sum over positions that may lie on several CP
ranks. `sequence_sums` all-reduces the partial sums over the CP group with each rank's own part
in the autograd graph, so every CP rank computes the same pair losses and its backward reaches
exactly its own positions; the loss value each rank returns is divided by the CP size (its
gradient is not), so the logged sums count every pair once."""

from __future__ import annotations

import json
import torch

from ..trainer import Trainer
from .dpo import dpo_loss
from .logprobs import batch_logprobs, sequence_sums
from .dpo_data import PreferenceData
from .records import fingerprint
from .reference import frozen_reference

REFERENCE_FILE = "reference_logps.json"
METRICS = ("chosen_reward", "rejected_reward", "margin", "accuracy")


class DPOTrainer(Trainer):
    def make_data(self, pad: int):
        packed = self.world.device.type == "cuda" or self.world.cp_size > 1
        return PreferenceData(self.cfg, self.tokenizer, self.world.dp_rank, self.world.dp_size,
                              pad, packed)

    # ------------------------------------------------------------------ reference
    def prepare(self, model) -> None:
        self.reference = frozen_reference(self)
        if self.cfg.train.dpo.reference == "precomputed":
            self.data.reference = self._precomputed(self.reference)
            self.eval_set = self.data.eval_batches(self.cfg.train.eval_batches)
            self.reference = None  # freed: training holds one model

    def _precomputed(self, ref) -> torch.Tensor:
        path = self.out_dir / REFERENCE_FILE
        key = fingerprint(self.cfg.data.source, self.cfg.train.seq_len, self.cfg.data.add_bos,
                          self.cfg.data.tokenizer)
        n = len(self.data.records)
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == key and len(saved.get("logps", [])) == n:
                return torch.tensor(saved["logps"], dtype=torch.float64)
        table = torch.zeros(n, 2, dtype=torch.float64, device=self.world.device)
        every = self.data.train_ids + self.data.eval_ids
        with torch.no_grad():
            for batch in self.data.batches_of(every):
                batch = self._batch_to_device(batch)
                sums = self._sums(ref, batch).double().view(-1, 2)
                if self.world.cp_rank == 0:  # the CP ranks of a group hold the same sums
                    table[batch["pair_ids"]] += sums
        table = self._reduce(table).cpu()
        if self.world.is_main:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": key, "logps": table.tolist()}))
            tmp.replace(path)
        self.world.barrier()
        return table

    # ------------------------------------------------------------------ the loss
    def _count(self, batch: dict) -> int:
        return batch["num_pairs"] if self.world.cp_rank == 0 else 0

    def _batch_to_device(self, batch: dict) -> dict:
        seq_index = batch["seq_index"]
        out = super()._batch_to_device(batch)
        if self.world.cp_size > 1:  # cut like the tokens (parallel/batch.py cp_slice)
            n = seq_index.shape[-1] // self.world.cp_size
            seq_index = seq_index[:, self.world.cp_rank * n:(self.world.cp_rank + 1) * n]
        out["seq_index"] = seq_index.to(self.world.device)
        return out

    def _cp_group(self):
        return self.world.mesh.cp.get_group() if self.world.cp_size > 1 else None

    def _sums(self, model, batch: dict, want_out: bool = False):
        """[2P] summed response log-probs (chosen, rejected interleaved) of this rank's pairs."""
        with self._autocast():
            out, lp = batch_logprobs(model, batch, self.cfg.train.loss_chunk_size)
        sums = sequence_sums(lp, batch["seq_index"].reshape(-1), 2 * int(batch["num_pairs"]),
                             self._cp_group())
        return (out, sums) if want_out else sums

    def _forward(self, model, batch: dict):
        d = self.cfg.train.dpo
        out, sums = self._sums(model, batch, want_out=True)
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(sums)
        else:
            with torch.no_grad():
                ref = self._sums(self.reference, batch).to(sums)
        losses, m = dpo_loss(sums[0::2], sums[1::2], ref[0::2], ref[1::2], d.beta,
                             d.label_smoothing)
        n = torch.as_tensor(self._count(batch), device=sums.device)
        total = losses.sum()
        if self.world.cp_size > 1:  # the value counted once over the CP group, full gradient
            total = total + (total.detach() / self.world.cp_size - total.detach())
        own = 1.0 if self.world.cp_rank == 0 else 0.0  # a CP group's pairs counted once
        self._metrics = {k: (m[k].sum() * own, n) for k in METRICS}
        return out, total, n

    @torch.no_grad()
    def evaluate(self, model) -> dict | None:
        """Held-out mean DPO loss and chosen-over-rejected accuracy."""
        if not self.eval_set:
            return None
        model.eval()
        total = torch.zeros(3, dtype=torch.float64, device=self.world.device)
        try:
            for batch in self.eval_set:
                _, loss, n = self._forward(model, self._batch_to_device(batch))
                acc = self._metrics["accuracy"][0]
                total += torch.stack([loss.double(), acc.double(), n.double()])
        finally:
            self._metrics = {}
            model.train()
        total = self._reduce(total)
        return {"eval_loss": float(total[0] / total[2].clamp(min=1)),
                "eval_accuracy": float(total[1] / total[2].clamp(min=1))}
