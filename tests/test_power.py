"""Power analysis against textbook values (Cohen / G*Power sample sizes, t tables, Fleiss'
two-proportion formula) and by simulation: the empirical power of the planned design is the
nominal power, and the type I error is alpha."""

import json
import math

import numpy as np
import pytest

from minimax01.cli import main
from minimax01.eval import power as pw


@pytest.mark.parametrize("p,df,value", [(0.975, 1, 12.7062), (0.975, 10, 2.2281), (0.95, 30, 1.6973),
                                        (0.995, 5, 4.0321), (0.9, 2, 1.8856), (0.025, 10, -2.2281)])
def test_t_quantiles_match_the_table(p, df, value):
    assert pw.t_ppf(p, df) == pytest.approx(value, abs=1e-4)
    assert pw.t_cdf(pw.t_ppf(p, df), df) == pytest.approx(p, abs=1e-10)


def test_noncentral_t_reduces_to_t_and_normal():
    for c, df in ((0.0, 3), (2.0, 10), (-1.5, 40)):
        assert pw.nct_sf(c, df, 0.0) == pytest.approx(1 - pw.t_cdf(c, df), abs=1e-7)
    # huge df: the noncentral t is a shifted normal
    assert pw.nct_sf(1.0, 5000, 2.5) == pytest.approx(1 - pw.NormalDist().cdf(1.0 - 2.5), abs=2e-3)


@pytest.mark.parametrize("d,two_sample,paired", [(0.2, 394, 199), (0.5, 64, 34), (0.8, 26, 15)])
def test_t_test_sample_sizes_match_g_power(d, two_sample, paired):
    """G*Power 3 exact values, alpha 0.05 two-sided, power 0.8 (Cohen's table rounds 394 -> 393)."""
    assert pw.sample_size(d, sd=1.0).n == two_sample
    assert pw.sample_size(d, sd=1.0, paired=True).n == paired
    assert pw.sample_size(d * 3, sd=3.0).n == two_sample  # only effect / sd matters


def test_achieved_powers_match_g_power():
    assert pw.t_power(64, 0.5, 1.0) == pytest.approx(0.8015, abs=1e-4)
    assert pw.t_power(34, 0.5, 1.0, paired=True) == pytest.approx(0.8078, abs=1e-4)
    assert pw.t_power(26, 0.8, 1.0) == pytest.approx(0.8075, abs=1e-4)


def test_z_sample_sizes_are_the_closed_form():
    za, zb = 1.959964, 0.841621
    assert pw.sample_size(0.5, sd=1.0, test="z").n == math.ceil(2 * (za + zb) ** 2 / 0.25)  # 63
    assert pw.sample_size(0.5, sd=1.0, test="z", paired=True).n == 32
    one_sided = pw.sample_size(0.5, sd=1.0, test="z", sides=1).n
    assert one_sided == math.ceil(2 * (1.644854 + zb) ** 2 / 0.25)  # 50


def test_two_proportions_match_fleiss():
    """p 0.5 vs 0.6, alpha 0.05 two-sided, power 0.8: 388 per group without continuity correction."""
    plan = pw.sample_size(0.1, baseline=0.5)
    assert plan.n == 388 and plan.test == "proportions" and plan.power >= 0.8
    assert pw.sample_size(-0.1, baseline=0.6).n == 388  # symmetric


def test_planning_errors_are_clear():
    with pytest.raises(ValueError, match="alpha"):
        pw.sample_size(0.1, sd=1, alpha=1.5)
    with pytest.raises(ValueError, match="effect"):
        pw.sample_size(0.0, sd=1)
    with pytest.raises(ValueError, match="sd, or the baseline"):
        pw.sample_size(0.1)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        pw.sample_size(0.2, baseline=0.9)


def test_simulated_power_and_type_one_error():
    rng = np.random.default_rng(0)
    trials = 3000
    n = pw.sample_size(0.5, sd=1.0, paired=True).n  # 34, nominal power 0.8078
    hits = null_hits = 0
    for _ in range(trials):
        a = rng.normal(0.0, 1.0, n)
        b = a + rng.normal(0.5, 1.0, n)  # differences ~ N(0.5, 1)
        hits += pw.paired_t(a, b)[2] < 0.05
        null_hits += pw.paired_t(a, a + rng.normal(0.0, 1.0, n))[2] < 0.05
    se = math.sqrt(0.8 * 0.2 / trials)
    assert abs(hits / trials - 0.8078) < 4 * se
    assert abs(null_hits / trials - 0.05) < 4 * math.sqrt(0.05 * 0.95 / trials)
    n2 = pw.sample_size(0.8, sd=1.0).n  # two samples of 26, nominal 0.8075
    hits = sum(pw.two_sample_t(rng.normal(0, 1, n2), rng.normal(0.8, 1, n2))[2] < 0.05
               for _ in range(trials))
    assert abs(hits / trials - 0.8075) < 4 * se


def test_simulated_power_of_binary_scores():
    rng = np.random.default_rng(1)
    plan = pw.sample_size(0.1, baseline=0.5)
    trials, hits = 2000, 0
    for _ in range(trials):
        a, b = rng.random(plan.n) < 0.5, rng.random(plan.n) < 0.6
        p = (a.sum() + b.sum()) / (2 * plan.n)
        z = (b.mean() - a.mean()) / math.sqrt(2 * p * (1 - p) / plan.n)
        hits += abs(z) > 1.959964
    assert abs(hits / trials - plan.power) < 4 * math.sqrt(0.16 / trials)


def test_seeds_and_mde_by_simulation():
    """Each arm = mean over k seeds, a seed = its own offset (sd seed_sd) + n 0/1 samples."""
    sd, seed_sd, effect, n = 0.5, 0.02, 0.05, 400
    k = pw.seeds_needed(effect, n, sd, seed_sd)
    assert pw.mde(n, sd, k, seed_sd) <= effect < pw.mde(n, sd, k - 1, seed_sd)
    assert pw.seeds_needed(effect, 10 ** 9, sd, 0.0) == 1
    rng = np.random.default_rng(2)
    trials, hits = 2000, 0
    for _ in range(trials):
        arms = []
        for mu in (0.5, 0.5 + effect):
            offs = rng.normal(0.0, seed_sd, k)
            arms.append(np.mean([(rng.random(n) < mu + o).mean() for o in offs]))
        se = math.sqrt(2 * (seed_sd ** 2 + sd ** 2 / n) / k)
        hits += abs(arms[1] - arms[0]) / se > 1.959964
    nominal = pw.NormalDist().cdf(effect / math.sqrt(2 * (seed_sd ** 2 + sd ** 2 / n) / k) - 1.959964)
    assert nominal >= 0.8
    assert abs(hits / trials - nominal) < 4 * math.sqrt(0.16 / trials)


def test_pilot_estimates_recover_the_variances():
    rng = np.random.default_rng(3)
    offsets = rng.normal(0, 0.03, 12)
    runs = [list((rng.random(4000) < 0.7 + o).astype(float)) for o in offsets]
    est = pw.pilot_estimates(runs)
    assert est["mean"] == pytest.approx(0.7 + offsets.mean(), abs=0.01)
    assert est["sd"] == pytest.approx(math.sqrt(0.21), abs=0.01)
    # the seeds' own spread, with the sampling noise of 4000 samples (sd 0.007) taken out
    assert est["seed_sd"] == pytest.approx(np.std(offsets, ddof=1), abs=0.006)
    assert pw.pilot_estimates([runs[0]])["seed_sd"] == 0.0


def test_compare_detects_a_real_difference_and_not_noise():
    rng = np.random.default_rng(4)
    a = (rng.random(500) < 0.6).astype(float)
    b = np.where(rng.random(500) < 0.3, 1.0, a)  # b fixes ~30% of a's errors
    res = pw.compare(a, b, resamples=2000)
    assert res.diff > 0 and res.significant and res.ci[0] > 0
    assert res.p_bootstrap < 0.01 and res.p_t < 0.01
    swap = rng.permutation(500)[:40]  # 20 items flipped each way: no net difference
    c = a.copy()
    c[swap[:20][a[swap[:20]] == 1][:10]] = 0
    c[swap[20:][a[swap[20:]] == 0][:10]] = 1
    same = pw.compare(a, c, resamples=2000)
    assert same.diff == pytest.approx((c.sum() - a.sum()) / 500)
    assert not same.significant and same.p_t > 0.2 and same.ci[0] < 0 < same.ci[1]
    # the bootstrap and the t-test agree on a large sample
    x = rng.normal(0, 1, 400)
    y = x + rng.normal(0.1, 1, 400)
    r = pw.compare(x, y, resamples=20000)
    assert r.p_bootstrap == pytest.approx(r.p_t, abs=0.02)
    with pytest.raises(ValueError, match="same items"):
        pw.compare([1, 0, 1], [1, 0])


def _eval_json(path, correct):
    samples = [{"id": f"{i}", "length": 64, "depth": 0.5, "correct": bool(c)}
               for i, c in enumerate(correct)]
    path.write_text(json.dumps({"task": "passkey", "samples": samples}))


def test_cli_plan_and_compare(tmp_path, capsys):
    assert main(["power", "plan", "--effect", "0.5", "--sd", "1"]) == 0
    assert "samples needed: 64 per arm" in capsys.readouterr().out
    out = tmp_path / "plan.json"
    assert main(["power", "plan", "--effect", "0.05", "--baseline", "0.5", "--seed-sd", "0.02",
                 "--samples", "400", "1600", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert [r["samples"] for r in plan["rows"]] == [400, 1600]
    assert plan["rows"][0]["seeds"] == pw.seeds_needed(0.05, 400, 0.5, 0.02)
    rng = np.random.default_rng(5)
    a = rng.random(300) < 0.5
    b = np.where(rng.random(300) < 0.4, True, a)
    _eval_json(tmp_path / "a.json", a)
    _eval_json(tmp_path / "b.json", b)
    capsys.readouterr()
    assert main(["power", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--resamples", "2000", "--json", str(tmp_path / "cmp.json")]) == 0
    text = capsys.readouterr().out
    assert "significant" in text and "paired t-test" in text
    assert json.loads((tmp_path / "cmp.json").read_text())["significant"] is True
    # pilot files: one per seed
    for s in range(3):
        (tmp_path / f"pilot{s}.txt").write_text("\n".join(str(int(x)) for x in rng.random(200) < 0.6))
    assert main(["power", "plan", "--effect", "0.05", "--paired", "--pilot"]
                + [str(tmp_path / f"pilot{s}.txt") for s in range(3)]) == 0
    assert "pilot: 3 run(s) x 200 samples" in capsys.readouterr().out


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["power", "plan", "--effect", "0.1"]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("1\n0\n1\n")
    (tmp_path / "b.txt").write_text("1\n0\n")
    assert main(["power", "compare", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == 2
    assert "same items" in capsys.readouterr().err
    (tmp_path / "c.txt").write_text("1\nbanana\n")
    assert main(["power", "compare", str(tmp_path / "a.txt"), str(tmp_path / "c.txt")]) == 2
    assert main(["power", "compare", str(tmp_path / "missing"), str(tmp_path / "a.txt")]) == 2
