"""Power analysis for evaluation and data experiments (the paper's statistical method: decide a
comparison's sample size, seeds and minimal detectable effect before running it; then test the
difference between two finished runs).

Everything is in terms of per-sample scores (1/0 for retrieval, any number for a metric):
* `sample_size(...)`: how many evaluation samples (per arm) detect an effect of `effect` at
  significance `alpha` with probability `power`: z (normal) or exact t (noncentral t), paired
  (both runs score the same items; `sd` is the sd of per-item differences) or two independent
  samples; binary scores get their variance from the baseline score.
* `seeds_needed(...)`: with seed-to-seed variance of a trained model's score (`seed_sd`), how many
  training seeds per arm, for a given number of samples; `mde(...)` the smallest detectable
  effect of a design.
* `compare(a, b)`: paired t-test and paired bootstrap for two runs' per-sample scores.

Only the standard library and numpy: the normal from `statistics.NormalDist`, Student's t from
the regularized incomplete beta function, the noncentral t by quadrature over the chi
distribution."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

_N = NormalDist()


# ---------------------------------------------------------------------- distributions
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t (bisection on `t_cdf`, to about 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def nct_sf(c: float, df: float, delta: float, points: int = 2000) -> float:
    """P(T > c) for noncentral t with `df` and noncentrality `delta`: T = (Z + delta) / S with
    S = chi_df / sqrt(df), so P = E_S[Phi(delta - c S)]; Simpson's rule over the chi density."""
    w_max = math.sqrt(df) + 12.0
    log_norm = math.log(2.0) - (df / 2.0) * math.log(2.0) - math.lgamma(df / 2.0)
    h = w_max / points
    total = 0.0
    for i in range(points + 1):
        w = i * h
        if w > 0:
            dens = math.exp(log_norm + (df - 1) * math.log(w) - w * w / 2.0)
        else:
            dens = math.exp(log_norm) if df == 1 else 0.0
        f = dens * _N.cdf(delta - c * w / math.sqrt(df))
        total += f * (1 if i in (0, points) else 4 if i % 2 else 2)
    return total * h / 3.0


# ---------------------------------------------------------------------- planning
def _check(alpha: float, power: float, effect: float, sides: int) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if effect == 0 or not math.isfinite(effect):
        raise ValueError(f"effect must be a non-zero number, got {effect}")
    if sides not in (1, 2):
        raise ValueError(f"sides must be 1 or 2, got {sides}")


def binary_sd(baseline: float, effect: float, paired: bool) -> float:
    """Per-sample sd for 0/1 scores. Paired: the sd of per-item differences assuming the two
    runs' errors independent (conservative for correlated runs); two-sample: not used (see
    `sample_size`)."""
    p0, p1 = baseline, baseline + effect
    if not (0.0 <= p0 <= 1.0 and 0.0 <= p1 <= 1.0):
        raise ValueError(f"baseline {p0} and baseline + effect {p1} must be in [0, 1]")
    return math.sqrt(p0 * (1 - p0) + p1 * (1 - p1)) if paired else math.sqrt(p0 * (1 - p0))


def t_power(n: int, effect: float, sd: float, alpha: float = 0.05, paired: bool = False,
            sides: int = 2) -> float:
    """Exact power of the t-test: one-sample/paired with n items, or two samples of n each."""
    d = abs(effect) / sd
    df, ncp = (n - 1, d * math.sqrt(n)) if paired else (2 * n - 2, d * math.sqrt(n / 2))
    if df < 1:
        return 0.0
    c = t_ppf(1 - alpha / sides, df)
    p = nct_sf(c, df, ncp)
    return p + nct_sf(c, df, -ncp) if sides == 2 else p


def z_power(n: int, effect: float, sd: float, alpha: float = 0.05, paired: bool = False,
            sides: int = 2) -> float:
    se = sd * math.sqrt((1 if paired else 2) / n)
    z = _N.inv_cdf(1 - alpha / sides)
    shift = abs(effect) / se
    return _N.cdf(shift - z) + (_N.cdf(-shift - z) if sides == 2 else 0.0)


@dataclass
class Plan:
    n: int              # samples per arm (pairs when paired)
    power: float        # achieved power at n
    test: str           # "z" | "t" | "proportions"
    paired: bool
    sd: float | None


def sample_size(effect: float, sd: float | None = None, baseline: float | None = None,
                alpha: float = 0.05, power: float = 0.8, paired: bool = False, test: str = "t",
                sides: int = 2) -> Plan:
    """Smallest n reaching `power`. `sd`: per-sample sd (of differences when paired); without it
    `baseline` is a 0/1 accuracy and the variance follows from it (two-sample: the normal
    approximation for two proportions, Fleiss without continuity correction)."""
    _check(alpha, power, effect, sides)
    if test not in ("z", "t"):
        raise ValueError(f"test must be 'z' or 't', got {test!r}")
    za, zb = _N.inv_cdf(1 - alpha / sides), _N.inv_cdf(power)
    if sd is None:
        if baseline is None:
            raise ValueError("give the per-sample sd, or the baseline score of 0/1 samples")
        if not paired:
            p0, p1 = baseline, baseline + effect
            binary_sd(p0, effect, False)  # range check
            pbar = (p0 + p1) / 2
            root = (za * math.sqrt(2 * pbar * (1 - pbar))
                    + zb * math.sqrt(p0 * (1 - p0) + p1 * (1 - p1)))
            n = math.ceil(root * root / (effect * effect) - 1e-9)
            q = math.sqrt(p0 * (1 - p0) + p1 * (1 - p1))
            achieved = _N.cdf((abs(effect) * math.sqrt(n) - za * math.sqrt(2 * pbar * (1 - pbar)))
                              / q)
            return Plan(n, achieved, "proportions", False, None)
        sd = binary_sd(baseline, effect, True)
    if not sd > 0:
        raise ValueError(f"sd must be positive, got {sd}")
    k = 1 if paired else 2
    n = max(2, math.ceil(k * ((za + zb) * sd / effect) ** 2 - 1e-9))
    if test == "z":
        return Plan(n, z_power(n, effect, sd, alpha, paired, sides), "z", paired, sd)
    while t_power(n, effect, sd, alpha, paired, sides) < power:  # t needs a little more than z
        n += 1
    while n > 2 and t_power(n - 1, effect, sd, alpha, paired, sides) >= power:
        n -= 1
    return Plan(n, t_power(n, effect, sd, alpha, paired, sides), "t", paired, sd)


def mde(n: int, sd: float, seeds: int = 1, seed_sd: float = 0.0, alpha: float = 0.05,
        power: float = 0.8, sides: int = 2) -> float:
    """Minimal detectable difference between two arms, each the mean of `seeds` trained models
    scored on n independent samples: (z_a + z_b) * sqrt(2 (seed_sd^2 + sd^2 / n) / seeds)."""
    za, zb = _N.inv_cdf(1 - alpha / sides), _N.inv_cdf(power)
    return (za + zb) * math.sqrt(2 * (seed_sd ** 2 + sd ** 2 / n) / seeds)


def seeds_needed(effect: float, n: int, sd: float, seed_sd: float, alpha: float = 0.05,
                 power: float = 0.8, sides: int = 2) -> int:
    """Training seeds per arm so that `mde(n, sd, seeds, seed_sd) <= effect`."""
    _check(alpha, power, effect, sides)
    za, zb = _N.inv_cdf(1 - alpha / sides), _N.inv_cdf(power)
    return max(1, math.ceil(2 * (za + zb) ** 2 * (seed_sd ** 2 + sd ** 2 / n) / effect ** 2 - 1e-9))


def pilot_estimates(runs: list[list[float]]) -> dict:
    """From a pilot's per-sample scores (one list per seed, same items): the mean, the per-sample
    sd (pooled within runs) and the seed sd (between runs' means, sampling noise removed)."""
    if not runs or any(len(r) < 2 for r in runs):
        raise ValueError("a pilot needs at least 2 per-sample scores per run")
    means = [float(np.mean(r)) for r in runs]
    within = float(np.mean([np.var(r, ddof=1) for r in runs]))
    n = float(np.mean([len(r) for r in runs]))
    seed_var = float(np.var(means, ddof=1)) - within / n if len(runs) > 1 else 0.0
    return {"mean": float(np.mean(means)), "sd": math.sqrt(within),
            "seed_sd": math.sqrt(max(seed_var, 0.0)), "runs": len(runs), "samples": int(n)}


# ---------------------------------------------------------------------- comparing two runs
@dataclass
class Comparison:
    n: int
    mean_a: float
    mean_b: float
    diff: float                 # mean of b - a
    t: float
    df: int
    p_t: float                  # paired t-test, two-sided
    p_bootstrap: float          # paired bootstrap (shifted to the null), two-sided
    ci: tuple[float, float]     # bootstrap percentile interval of the difference
    alpha: float

    @property
    def significant(self) -> bool:
        return self.p_t < self.alpha and self.p_bootstrap < self.alpha

    def to_dict(self) -> dict:
        return {"n": self.n, "mean_a": self.mean_a, "mean_b": self.mean_b, "diff": self.diff,
                "t": self.t, "df": self.df, "p_t": self.p_t, "p_bootstrap": self.p_bootstrap,
                "ci": list(self.ci), "alpha": self.alpha, "significant": self.significant}


def paired_t(a, b) -> tuple[float, int, float]:
    """(t, df, two-sided p) of the per-item differences b - a."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = d.size
    if n < 2:
        raise ValueError("a paired test needs at least 2 items")
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd == 0.0:  # every item moved by the same amount
        return (math.copysign(math.inf, mean) if mean else 0.0), n - 1, (0.0 if mean else 1.0)
    t = mean / (sd / math.sqrt(n))
    return t, n - 1, 2 * t_cdf(-abs(t), n - 1)


def two_sample_t(a, b) -> tuple[float, int, float]:
    """Student's two-sample t-test (pooled variance): (t, df, two-sided p) of mean(b) - mean(a)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        raise ValueError("a two-sample test needs at least 2 scores per run")
    df = na + nb - 2
    pooled = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / df
    se = math.sqrt(pooled * (1 / na + 1 / nb))
    diff = float(b.mean() - a.mean())
    if se == 0.0:
        return (math.copysign(math.inf, diff) if diff else 0.0), df, (0.0 if diff else 1.0)
    t = diff / se
    return t, df, 2 * t_cdf(-abs(t), df)


def compare(a, b, alpha: float = 0.05, resamples: int = 10_000, seed: int = 0) -> Comparison:
    """Is run b's mean per-sample score different from run a's, on the same items?"""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"the two runs must score the same items: {a.size} vs {b.size} scores")
    if not 0 < alpha < 1 or resamples < 100:
        raise ValueError("alpha must be in (0, 1) and resamples >= 100")
    t, df, p = paired_t(a, b)
    d = b - a
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    boot = d[idx].mean(1)
    centered = boot - d.mean()
    p_boot = float((np.abs(centered) >= abs(d.mean()) - 1e-15).mean()) if d.any() else 1.0
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return Comparison(int(d.size), float(a.mean()), float(b.mean()), float(d.mean()), float(t),
                      df, float(p), p_boot, (float(lo), float(hi)), alpha)


# ---------------------------------------------------------------------- score files
def _score(item, where: str) -> float:
    if isinstance(item, bool):
        return float(item)
    if isinstance(item, (int, float)):
        return float(item)
    if isinstance(item, dict):
        for key in ("score", "correct", "accuracy", "nll", "loss"):
            if key in item:
                return _score(item[key], where)
    raise ValueError(f"{where}: no per-sample score (a number, or an object with 'score' or "
                     f"'correct')")


def load_scores(path: str | Path) -> tuple[list[str] | None, list[float]]:
    """Per-sample scores from a file: `eval --json` output (its "samples"), a JSON list, JSONL
    (one number or object per line) or one number per line. Returns (ids or None, scores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no scores file at {path}")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
        items = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{i}: not a number or a JSON object") from None
    if data is not None:
        if isinstance(data, dict) and isinstance(data.get("samples"), list):
            items = data["samples"]
        elif isinstance(data, list):
            items = data
        elif isinstance(data, (int, float)):
            items = [data]
        else:
            raise ValueError(f"{path}: expected a list of scores or an object with 'samples'")
    if not items:
        raise ValueError(f"{path}: no scores")
    scores = [_score(x, f"{path} item {i}") for i, x in enumerate(items)]
    if any(not math.isfinite(s) for s in scores):
        raise ValueError(f"{path}: a score is not finite")
    ids = [str(x["id"]) for x in items] if all(isinstance(x, dict) and "id" in x
                                              for x in items) else None
    return ids, scores


def aligned(a: tuple, b: tuple) -> tuple[list[float], list[float]]:
    """Pair two `load_scores` results by id (when both have ids) or by order."""
    (ids_a, sa), (ids_b, sb) = a, b
    if ids_a is not None and ids_b is not None:
        if len(set(ids_a)) != len(ids_a) or len(set(ids_b)) != len(ids_b):
            raise ValueError("duplicate sample ids in a scores file")
        common = [i for i in ids_a if i in set(ids_b)]
        if len(common) != len(ids_a) or len(common) != len(ids_b):
            raise ValueError(f"the runs scored different items ({len(ids_a)} and {len(ids_b)} "
                             f"ids, {len(common)} in common)")
        pos_b = {i: k for k, i in enumerate(ids_b)}
        return sa, [sb[pos_b[i]] for i in ids_a]
    if len(sa) != len(sb):
        raise ValueError(f"the runs have {len(sa)} and {len(sb)} scores; a paired comparison "
                         f"needs the same items")
    return sa, sb
