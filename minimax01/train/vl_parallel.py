"""MiniMax-VL-01 training under the text trainer's layouts: FSDP2 x expert parallel (+ETP)
over one DeviceMesh (parallel/parallelize.py), with each data-parallel rank reading its own
rows of the global image-text batch.

Model. The language model is parallelized exactly as the text trainer's (`parallelize`: EP,
then FSDP2 of every decoder layer, the embeddings and the LM root). The vision tower and the
projector are FSDP2-sharded over the same dense mesh, one unit per ViT block plus one for the
tower's embeddings and pre-LN, one for the projector, and the VL root holds `image_newline`.
Why shard rather than replicate: the released tower is 303M parameters (plus a 44M projector),
i.e. 1.4 GB of fp32 weights and ~5.6 GB with the gradient and AdamW's state on every rank if
replicated, against a few all-gathers per step that overlap like the LM's; and FSDP2 gradients of
every part are then reduced, divided and clipped by the same code (parallel/scaling.py) with no
separate all-reduce for a replicated part. Because the parts are separate FSDP units, a freeze
policy (train.freeze) freezes whole units: their parameters keep requires_grad=False through
fully_shard, get no gradient, no reduce-scatter and no optimizer state, on every rank alike.

Every rank runs the tower at every step, also when its rows hold no image (a text-only JSONL
record): it then runs one black tile whose features join the graph with weight 0. FSDP2's
all-gathers and reduce-scatters are collectives, so a rank skipping the tower would hang the
others (`tower_on_every_rank`).

Data (`RankBatches`). Every rank packs the same global batch of train.batch_size rows from the
same example stream (tokenising and packing are cheap and deterministic) and keeps rows
[r*k, (r+1)*k) of it, k = batch_size / dp: no row is read twice, and the union over ranks is
what one process trains on, so the loss (the mean over every target token of the global batch)
and the gradients equal one process's. Only a rank's own images go through the image
processor. (A JSONL record's image is still decoded on every rank, for its token count.)

Context parallelism (parallel.cp > 1) is refused: a CP rank would hold a slice of a sequence
whose image tokens come from images another rank's slice needs."""

from __future__ import annotations

import dataclasses
import warnings

import torch


def check_parallel(cfg) -> None:
    """Before any process group: what no VL layout supports (one-line errors)."""
    if cfg.parallel.cp > 1:
        raise ValueError("parallel.cp > 1: context parallelism is not supported for VL runs "
                         "(a sequence's image tokens would be split over ranks); use cp=1, "
                         "data parallel (dp_shard) and ep")


def check_layout(cfg, world, text_config) -> None:
    """One-line errors for what VL training does not support under this layout."""
    if world.mesh is None:
        return
    if text_config.tie_word_embeddings:
        raise ValueError("model.tie_word_embeddings: VL training under FSDP needs untied "
                         "embeddings (the image splice calls embed_tokens outside the language "
                         "model's forward)")
    if cfg.train.batch_size % world.dp_size:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} must be a multiple of the "
                         f"{world.dp_size} data-parallel ranks (each rank reads its own rows)")


def parallelize_vl(model, world, pcfg):
    """Rank 0's initial weights everywhere, the language model as the text trainer's, the
    tower and projector FSDP2-sharded (see the module docstring). The same module back."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..parallel.config import PARAM_DTYPES
    from ..parallel.fsdp import broadcast_parameters
    from ..parallel.parallelize import parallelize

    if world.mesh is None:
        return model
    model.to(world.device)
    if pcfg.sync_init:
        broadcast_parameters(model)  # the tower and projector too, not only the LM
    parallelize(model.language_model, world, dataclasses.replace(pcfg, sync_init=False))
    mp = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[pcfg.param_dtype],
                              reduce_dtype=torch.float32)
    dense = dict(mesh=world.mesh.dense, mp_policy=mp,
                 reshard_after_forward=pcfg.reshard_after_forward)
    for block in model.vision_tower.vision_model.encoder.layers:
        fully_shard(block, **dense)
    fully_shard(model.vision_tower, **dense)
    fully_shard(model.multi_modal_projector, **dense)
    fully_shard(model, mesh=world.mesh.dense, mp_policy=mp, reshard_after_forward=False)
    tower_on_every_rank(model)
    # the tower's output (CLS dropped: x[:, 1:]) and the projector's are views; FSDP2 warns
    # that an in-place op on them would skip its backward hook. Nothing modifies them in place
    # (the gradients equal one process's: tests/test_vl_parallel.py), so the warning is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDPVisionTower|"
                            r"FSDPProjector)\) returned a view tensor")
    return model


def tower_on_every_rank(model) -> None:
    """A forward without images still runs the tower and projector (on one black tile), with
    its features spliced as zero rows (see the module docstring)."""
    inner = model.image_features

    def image_features(pixel_values, image_sizes, tile_batch=None):
        if len(pixel_values):
            return inner(pixel_values, image_sizes, tile_batch)
        s = model.config.vision_config.image_size
        tile = torch.zeros(1, model.config.vision_config.num_channels, s, s,
                           device=model.image_newline.device)
        feats = model.multi_modal_projector(model.vision_tower(tile))
        # no rows, a gradient of 0 for every part (image_newline too: the root unit's)
        return [feats.reshape(-1, feats.shape[-1])[:0] + model.image_newline[None][:0]]

    model.image_features = image_features


class ExampleStream:
    """An iterator over (record index, example) pairs -> examples, remembering the record
    index of the next example (`position`), so a resume can start the stream there."""

    def __init__(self, pairs, start: int = 0):
        self.pairs, self.position = pairs, start

    def __iter__(self):
        return self

    def __next__(self):
        index, ex = next(self.pairs)
        ex.record = index
        self.position = index + 1
        return ex


class RankBatches:
    """This rank's rows of each global batch (see the module docstring): a micro-batch dict as
    VLBatches gives (input_ids [1, k*seq_len], labels, cu_seqlens, images in order)."""

    def __init__(self, stream: ExampleStream, rows: int, seq_len: int, pad_id: int,
                 dp_rank: int = 0, dp_size: int = 1):
        from .data.vl_data import VLBatches

        if rows % dp_size:
            raise ValueError(f"train.batch_size {rows} is not a multiple of {dp_size} ranks")
        self.stream, self.rows, self.dp_rank, self.dp_size = stream, rows, dp_rank, dp_size
        self.packer = VLBatches(stream, 1, seq_len, pad_id)

    def next_batch(self) -> dict:
        k = self.rows // self.dp_size
        mine = []
        for i in range(self.rows):
            row = self.packer.next_batch()
            if row is None:
                raise ValueError("the VL data stream ended")
            if i // k == self.dp_rank:
                mine.append(row)
        return merge_rows(mine)

    def state_dict(self) -> dict:
        """The record index of the next example not yet in a row (the packer's pending one,
        if it holds one)."""
        pending = self.packer.pending
        return {"position": pending.record if pending is not None else self.stream.position}


def merge_rows(rows: list[dict]) -> dict:
    """Single-row micro-batches -> one packed micro-batch (what collate of the rows gives)."""
    cu, offset = [torch.zeros(1, dtype=torch.int32)], 0
    for r in rows:
        cu.append(r["cu_seqlens"][1:] + offset)
        offset += r["input_ids"].shape[1]
    labels = torch.cat([r["labels"] for r in rows], 1)
    return {"input_ids": torch.cat([r["input_ids"] for r in rows], 1), "labels": labels,
            "cu_seqlens": torch.cat(cu), "num_targets": sum(r["num_targets"] for r in rows),
            "images": [im for r in rows for im in r["images"]]}


def gather_model(model, world, vcfg):
    """The trained weights as a plain model on the main rank's CPU (None elsewhere); every
    rank takes part. In one process: the model itself."""
    if world.mesh is None:
        return model
    from ..checkpoint.hf import _materialize_buffers
    from ..parallel.checkpoint import full_state_dict
    from ..vision.model import MiniMaxVLForConditionalGeneration

    state = full_state_dict(model)
    plain = None
    if world.is_main:
        plain = MiniMaxVLForConditionalGeneration.from_config_on_meta(vcfg)
        plain.load_state_dict(state, strict=True, assign=True)
        _materialize_buffers(plain.language_model, torch.device("cpu"))  # lightning slopes
        plain.eval()
    world.barrier()
    return plain
