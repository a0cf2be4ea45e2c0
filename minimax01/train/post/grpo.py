"""The GRPO objective (Shao et al. 2024) with MiniMax-01's changes (paper §5, online RL), as
pure functions on fixed log-probs (tests/test_post_objectives.py checks them against plain
loops):

  * advantages relative to the group of G rollouts of the same prompt: (r - mean) / std;
  * `balance`: positive and negative advantages scaled to the same total mass over tokens
    (centring balances them per sequence; long wrong answers would still outweigh short right
    ones per token);
  * prompt filtering: groups whose pass rate (share of rewards > 0) is outside [lo, hi] are
    dropped (an all-right or all-wrong group carries no signal);
  * clipping: `ppo` is max(-A r, -A clip(r, 1-lo, 1+hi)); `paper` adds the extra importance-
    ratio clipping: a token with ratio > `ratio_drop` and a negative advantage is dropped (PPO's
    min keeps such tokens unclipped, and their gradient is unbounded); `none` is -A r;
  * KL to the reference: `k3` (GRPO's exp(ref-lp) - (ref-lp) - 1), `k1` (lp - ref), `paper`:
    E[stop_grad(log pi - log pi_ref) * log pi], whose gradient is exactly the on-policy gradient
    of KL(pi || pi_ref); `paper_prob` the literal reading with token probabilities,
    stop_grad(pi - pi_ref) * log pi. The logged `kl` is always the k3 estimate."""

from __future__ import annotations

import torch

from .logprobs import sequence_sums


def group_advantages(rewards: torch.Tensor, std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: centred per group, divided by the group's std."""
    adv = rewards - rewards.mean(1, keepdim=True)
    if std:
        adv = adv / (rewards.std(1, keepdim=True, unbiased=False) + eps)
    return adv


def pass_rate_keep(rewards: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """[P] bool: groups whose share of rewards > 0 lies in [lo, hi]."""
    rate = (rewards > 0).float().mean(1)
    return (rate >= lo) & (rate <= hi)


def balance_advantages(adv: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Scale positive and negative advantages ([S], response lengths [S]) so that both have the
    mass (pos + neg) / 2 summed over tokens; unchanged when either side is empty."""
    mass = adv * lengths
    pos, neg = mass.clamp(min=0).sum(), (-mass).clamp(min=0).sum()
    if pos <= 0 or neg <= 0:
        return adv
    mid = (pos + neg) / 2
    return torch.where(adv > 0, adv * (mid / pos), adv * (mid / neg))


def kl_term(logp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """The per-token KL penalty whose gradient is used (see the module docstring)."""
    if kind == "k1":
        return logp - ref
    if kind == "k3":
        d = ref - logp
        return d.exp() - d - 1
    if kind == "paper":
        return (logp - ref).detach() * logp
    if kind == "paper_prob":
        return (logp.exp() - ref.exp()).detach() * logp
    raise ValueError(f"unknown KL kind {kind!r}")


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                    mask: torch.Tensor, *, clip: str = "paper", clip_low: float = 0.2,
                    clip_high: float = 0.2, ratio_drop: float = 3.0,
                    ref_logp: torch.Tensor | None = None, kl: str = "none",
                    kl_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [S, T] (0 outside `mask`) for log-probs [S, T] of the sampled tokens
    under the policy, the rollout policy (`old_logp`) and the reference; `adv` [S] (or [S, T],
    each token its sequence's advantage: the packed layout).
    Metrics (detached sums over masked tokens): clipped, dropped, kl, ratio, tokens."""
    mask = mask.to(logp.dtype)
    a = (adv[:, None] if adv.dim() == 1 else adv).to(logp.dtype)  # per sequence or per token
    ratio = (logp - old_logp).exp()
    pg1 = -a * ratio
    if clip == "none":
        pg, clipped = pg1, torch.zeros_like(pg1, dtype=torch.bool)
    else:
        pg2 = -a * ratio.clamp(1 - clip_low, 1 + clip_high)
        pg, clipped = torch.maximum(pg1, pg2), pg2 > pg1
    dropped = torch.zeros_like(clipped)
    if clip == "paper":
        dropped = (ratio > ratio_drop) & (a < 0)
        pg = pg.masked_fill(dropped, 0.0)
    loss = pg
    stats = {"clipped": (clipped.to(mask) * mask).sum().detach(),
             "dropped": (dropped.to(mask) * mask).sum().detach(),
             "ratio": (ratio * mask).sum().detach(), "tokens": mask.sum().detach(),
             "kl": torch.zeros((), dtype=logp.dtype, device=logp.device)}
    if ref_logp is not None:
        d = (ref_logp - logp).detach()
        stats["kl"] = ((d.exp() - d - 1) * mask).sum()
        if kl != "none" and kl_coef:
            loss = loss + kl_coef * kl_term(logp, ref_logp, kl)
    return loss * mask, stats


def aggregate(token_loss: torch.Tensor, seq_index: torch.Tensor, num_sequences: int,
              how: str) -> tuple[torch.Tensor, int]:
    """(sum, denominator contribution) of a packed [N] token loss (`seq_index` [N]: the
    sequence of each response token, -1 elsewhere): `token` sums every token (the step divides
    by the global token count), `sequence` averages within each sequence first (the step divides
    by the number of sequences)."""
    keep = seq_index >= 0
    if how == "token":
        return token_loss[keep].sum(), int(keep.sum())
    lengths = torch.bincount(seq_index[keep], minlength=num_sequences).clamp(min=1)
    per_seq = sequence_sums(token_loss, seq_index, num_sequences) / lengths
    return per_seq.sum(), num_sequences
