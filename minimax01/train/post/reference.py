"""The frozen reference model of DPO and of GRPO's KL term: built exactly like the policy (the
same seed, parallel layout, `train.init_from` checkpoint and stage `init`: the starting weights),
so on a resume it is still the starting point, not the resumed weights."""

from __future__ import annotations


def frozen_reference(trainer):
    from ...parallel.parallelize import parallelize

    ref = parallelize(trainer.build_model(), trainer.world, trainer.cfg.parallel)
    if trainer.cfg.train.init_from:  # fine-tuning a released checkpoint: its weights
        trainer._init_from(ref, resumed=False)
    if trainer.init is not None:
        trainer.init(ref, None)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
