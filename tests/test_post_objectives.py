"""DPO loss and gradients on a hand-worked example; the GRPO objective (each clipping rule, the
KL terms, advantages, balancing, pass-rate filtering) against plain loops on fixed log-probs."""

import math

import pytest
import torch

from minimax01.train.post.dpo import dpo_loss
from minimax01.train.post.logprobs import sequence_sums, token_logprobs
from minimax01.train.post.grpo import (aggregate, balance_advantages, group_advantages,
                                       grpo_token_loss, pass_rate_keep)


# ---------------------------------------------------------------------- DPO
def test_dpo_loss_and_gradients_by_hand():
    # pi_c = -2, pi_r = -3, ref_c = ref_r = -2.5, beta = 0.5:
    # logits = 0.5 * ((-2 + 2.5) - (-3 + 2.5)) = 0.5
    # loss = -log sigmoid(0.5) = log(1 + e^-0.5) = log(1.6065307) = 0.4740770
    # dloss/dlogits = -sigmoid(-0.5) = -0.3775407; d/dpi_c = 0.5 * that = -0.1887704 = -d/dpi_r
    pc = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.5], dtype=torch.float64)
    losses, m = dpo_loss(pc, pr, ref, ref, beta=0.5)
    losses.sum().backward()
    assert losses.item() == pytest.approx(0.4740770, abs=1e-6)
    assert pc.grad.item() == pytest.approx(-0.1887704, abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.1887704, abs=1e-6)
    assert m["chosen_reward"].item() == pytest.approx(0.25)    # 0.5 * (-2 + 2.5)
    assert m["rejected_reward"].item() == pytest.approx(-0.25)  # 0.5 * (-3 + 2.5)
    assert m["margin"].item() == pytest.approx(0.5) and m["accuracy"].item() == 1.0
    # label smoothing 0.1: 0.9 * 0.4740770 + 0.1 * log(1 + e^0.5) (= 0.9740770) = 0.5240770
    # dloss/dlogits = -0.9 * 0.3775407 + 0.1 * 0.6224593 = -0.2775407; d/dpi_c = -0.1387704
    pc.grad = pr.grad = None
    losses, _ = dpo_loss(pc, pr, ref, ref, beta=0.5, label_smoothing=0.1)
    losses.sum().backward()
    assert losses.item() == pytest.approx(0.5240770, abs=1e-6)
    assert pc.grad.item() == pytest.approx(-0.1387704, abs=1e-6)


def test_sequence_sums_of_token_logprobs_by_hand():
    # two positions, vocab 2; logits [0, ln 3] -> p = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [5.0, 1.0]]])
    targets = torch.tensor([[1, 0, -100]])
    lp = token_logprobs(logits, targets)
    assert lp.tolist()[0][:2] == pytest.approx([math.log(0.75), math.log(0.25)])
    assert lp[0, 2] == 0
    sums = sequence_sums(lp[0], torch.tensor([1, 1, -1]), 3)
    assert sums.tolist() == pytest.approx([0.0, math.log(0.75 * 0.25), 0.0])


# ---------------------------------------------------------------------- GRPO: plain references
def ref_token_loss(lp, old, ref, adv, mask, clip, lo, hi, drop, kl, coef):
    """One token at a time, Python floats: (loss values, clipped, dropped)."""
    out, n_clip, n_drop = [], 0, 0
    for s in range(len(lp)):
        row = []
        for t in range(len(lp[s])):
            if not mask[s][t]:
                row.append(0.0)
                continue
            a, r = adv[s], math.exp(lp[s][t] - old[s][t])
            unclipped = -a * r
            if clip == "none":
                v = unclipped
            else:
                clipped = -a * min(max(r, 1 - lo), 1 + hi)
                v = max(unclipped, clipped)
                n_clip += clipped > unclipped
                if clip == "paper" and r > drop and a < 0:
                    v, n_drop = 0.0, n_drop + 1
            d = ref[s][t] - lp[s][t]
            v += coef * {"none": 0.0, "k1": -d, "k3": math.exp(d) - d - 1,
                         "paper": -d * lp[s][t],
                         "paper_prob": (math.exp(lp[s][t]) - math.exp(ref[s][t])) * lp[s][t]}[kl]
            row.append(v)
        out.append(row)
    return out, n_clip, n_drop


def ref_grad(lp, old, ref, adv, mask, clip, lo, hi, drop, kl, coef):
    """d(sum of the loss)/d lp by the rules written out per token."""
    g = []
    for s in range(len(lp)):
        row = []
        for t in range(len(lp[s])):
            if not mask[s][t]:
                row.append(0.0)
                continue
            a, r = adv[s], math.exp(lp[s][t] - old[s][t])
            gp = -a * r  # d(-a r)/d lp
            if clip != "none":
                clipped = -a * min(max(r, 1 - lo), 1 + hi)
                if clipped > -a * r:
                    gp = 0.0  # the clipped branch is constant
                if clip == "paper" and r > drop and a < 0:
                    gp = 0.0
            x, y = lp[s][t], ref[s][t]
            gk = {"none": 0.0, "k1": 1.0, "k3": 1 - math.exp(y - x),
                  "paper": x - y, "paper_prob": math.exp(x) - math.exp(y)}[kl]
            row.append(gp + coef * gk)
        g.append(row)
    return g


def fixed_logprobs():
    # ratios exp(lp - old): 1.0, 1.5 (above 1+hi), 0.5 (below 1-lo), 4.0 (above ratio_drop)
    lp = [[-1.0, -1.0 + math.log(1.5), -2.0, -0.5], [-0.3, -1.2 + math.log(4.0), -0.7, -1.1]]
    old = [[-1.0, -1.0, -2.0 - math.log(0.5), -0.5 - math.log(4.0)], [-0.3, -1.2, -0.9, -1.1]]
    ref = [[-1.2, -0.8, -2.1, -0.4], [-0.5, -1.0, -0.7, -1.5]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]
    return lp, old, ref, mask


@pytest.mark.parametrize("clip", ["ppo", "paper", "none"])
@pytest.mark.parametrize("kl", ["none", "k1", "k3", "paper", "paper_prob"])
@pytest.mark.parametrize("adv", [[1.3, -0.7], [-0.9, 0.4]])
def test_grpo_loss_matches_plain_loops(clip, kl, adv):
    lp, old, ref, mask = fixed_logprobs()
    args = (clip, 0.2, 0.2, 3.0, kl, 0.05)
    expect, n_clip, n_drop = ref_token_loss(lp, old, ref, adv, mask, *args)
    x = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_token_loss(x, torch.tensor(old, dtype=torch.float64),
                                  torch.tensor(adv, dtype=torch.float64),
                                  torch.tensor(mask), clip=clip, clip_low=0.2, clip_high=0.2,
                                  ratio_drop=3.0, ref_logp=torch.tensor(ref, dtype=torch.float64),
                                  kl=kl, kl_coef=0.05)
    assert loss.tolist() == [pytest.approx(r, abs=1e-12) for r in expect]
    loss.sum().backward()
    want = ref_grad(lp, old, ref, adv, mask, *args)
    assert x.grad.tolist() == [pytest.approx(r, abs=1e-12) for r in want]
    assert stats["clipped"].item() == (n_clip if clip != "none" else 0)
    assert stats["dropped"].item() == n_drop and stats["tokens"].item() == 7
    if clip == "paper":  # the ratio-4 token of the negative-advantage row is dropped
        assert n_drop == 1
    k3 = sum(math.exp(ref[s][t] - lp[s][t]) - (ref[s][t] - lp[s][t]) - 1
             for s in range(2) for t in range(4) if mask[s][t])
    assert stats["kl"].item() == pytest.approx(k3)


def test_paper_kl_gradient_is_the_kl_gradient_on_policy():
    """E_pi[stop_grad(log pi - log ref) grad log pi] = grad KL(pi || ref), exactly, by summing
    over the vocabulary with weights pi (what sampling estimates)."""
    theta = torch.tensor([0.3, -1.0, 0.8, 0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.5, -0.2, 0.4], dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    from minimax01.train.post.grpo import kl_term

    (logp.exp().detach() * kl_term(logp, ref, "paper")).sum().backward()
    g = theta.grad.clone()
    theta.grad = None
    logp = torch.log_softmax(theta, 0)
    (logp.exp() * (logp - ref)).sum().backward()  # KL(pi || ref)
    assert torch.allclose(g, theta.grad, atol=1e-12)


def test_group_advantages_pass_rate_and_balance():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(r)
    # group 0: mean 0.5, std 0.5 -> +-1; group 1: all equal -> 0; group 2: mean .25, std .4330
    assert a[0].tolist() == pytest.approx([1, -1, -1, 1], abs=1e-5)
    assert a[1].tolist() == [0, 0, 0, 0]
    s = math.sqrt(0.1875)
    assert a[2].tolist() == pytest.approx([-0.25 / s] * 3 + [0.75 / s], abs=1e-5)
    assert group_advantages(r, std=False)[2].tolist() == pytest.approx([-0.25] * 3 + [0.75])
    assert pass_rate_keep(r, 0.1, 0.9).tolist() == [True, False, True]
    assert pass_rate_keep(r, 0.0, 0.25).tolist() == [False, False, True]
    # balance: advantages [2, -1, -1] over lengths [1, 4, 2]: positive mass 2, negative 6,
    # both scaled to 4: positives x2, negatives x(2/3)
    b = balance_advantages(torch.tensor([2.0, -1.0, -1.0]), torch.tensor([1.0, 4.0, 2.0]))
    assert b.tolist() == pytest.approx([4.0, -2 / 3, -2 / 3])
    assert balance_advantages(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])).tolist() == [1, 2]


def test_aggregate_token_and_sequence():
    # packed: sequence 0 has tokens of loss 1, 2; sequence 1 one token of loss 3; -1: prompts
    loss = torch.tensor([9.0, 1.0, 2.0, 9.0, 3.0])
    seq = torch.tensor([-1, 0, 0, -1, 1])
    total, n = aggregate(loss, seq, 2, "token")
    assert total.item() == pytest.approx(6.0) and n == 3
    total, n = aggregate(loss, seq, 2, "sequence")
    assert total.item() == pytest.approx(1.5 + 3.0) and n == 2


def test_chunked_token_logprobs_match_log_softmax_values_and_gradients():
    from minimax01.ops.loss import chunked_token_logprobs

    torch.manual_seed(0)
    h = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (11,))
    t[[2, 7]] = -100
    g = torch.randn(11, dtype=torch.float64)
    plain = token_logprobs(h @ w.t(), t)
    (plain * g).sum().backward()
    want = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = chunked_token_logprobs(h, w, t, chunk_size=4)
    (got * g).sum().backward()
    assert torch.allclose(got.double(), plain.double(), atol=1e-5) and got[2] == 0
    assert torch.allclose(h.grad, want[0], atol=1e-5) and torch.allclose(w.grad, want[1], atol=1e-5)
