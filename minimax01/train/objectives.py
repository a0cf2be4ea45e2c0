"""Which trainer runs a config: `train.objective` "lm" (next-token, train/trainer.py), "dpo"
(train/post/dpo_trainer.py) or "grpo" (train/post/rl_trainer.py); all share the loop."""

from __future__ import annotations


def trainer_class(cfg):
    objective = cfg.train.objective
    if objective == "dpo":
        from .post.dpo_trainer import DPOTrainer

        return DPOTrainer
    if objective == "grpo":
        from .post.rl_trainer import GRPOTrainer

        return GRPOTrainer
    from .trainer import Trainer

    return Trainer


def make_trainer(cfg, world=None, init=None):
    return trainer_class(cfg)(cfg, world, init=init)
