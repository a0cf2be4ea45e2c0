"""Post-training objectives (docs/post_training.md): DPO on preference pairs (dpo.py,
dpo_trainer.py) and online RL with the MiniMax-01 GRPO variant (grpo.py, rollout.py,
rl_trainer.py), both run by the ordinary trainer loop (train/trainer.py)."""
