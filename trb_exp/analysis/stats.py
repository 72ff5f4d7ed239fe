"""Statistics for comparing runs: pure functions on numbers, no I/O.

Student-t confidence intervals without scipy, paired per-seed differences, the best checkpoint of a
sweep (the paper's protocol), steps to a target, a bootstrap CI for step-time ratios, a random-effects
estimate across settings (DerSimonian-Laird, Hartung-Knapp CI) and the exact McNemar test.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

# two-sided 97.5% quantiles of Student's t, df = 1..30
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
         2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
         2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
         2.048407, 2.045230, 2.042272)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table up to 30, then the
    Cornish-Fisher expansion around the normal quantile, error < 1e-5). No scipy needed."""
    if df < 1:
        raise ValueError(f"df={df}: need at least 1 degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(values) -> tuple[float, float | None, int]:
    """(mean, half-width of the 95% Student-t CI, n). The half-width is None for n < 2."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = sum(v) / n
    if n < 2:
        return mean, None, n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return mean, t_quantile_975(n - 1) * sd / math.sqrt(n), n


def paired_difference(a: dict, b: dict) -> dict:
    """Per-seed differences a[seed] − b[seed] over the seeds in both (sorted), their mean and 95% CI.
    Returns {"seeds", "diffs", "mean", "half", "n"} (mean/half None without common seeds)."""
    seeds = sorted(set(a) & set(b))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    if not diffs:
        return {"seeds": [], "diffs": [], "mean": None, "half": None, "n": 0}
    mean, half, n = mean_ci(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "half": half, "n": n}


def best_checkpoint(candidates):
    """The candidate with the highest ``value``; ties go to the earliest step, then the smallest
    (config, seed, run). Candidates are dicts with at least value, step, config, seed, run."""
    cands = list(candidates)
    if not cands:
        return None
    return min(cands, key=lambda c: (-c["value"], c["step"], str(c["config"]), c["seed"], str(c["run"])))


def steps_to_target(steps, values, target: float):
    """The first step (in increasing step order) whose value is >= target (up to 1e-9, so that
    0.8 × 0.75 is reached by 0.6), else None."""
    for s, v in sorted(zip(steps, values)):
        if v >= target - 1e-9:
            return s
    return None


def curve_auc(evals: dict[int, float]) -> float:
    """Mean pass@1 over training (the studies' AUC): the trapezoid area under the (step, value) curve / steps spanned."""
    steps = sorted(evals)
    if len(steps) < 2:
        raise ValueError(f"auc needs >= 2 evaluated steps, got {steps}")
    area = sum((evals[a] + evals[b]) / 2 * (b - a) for a, b in zip(steps, steps[1:]))
    return area / (steps[-1] - steps[0])


def closest_step(steps, k: int):
    """The step of ``steps`` closest to k (ties: the smaller)."""
    steps = sorted(steps)
    return min(steps, key=lambda s: (abs(s - k), s)) if steps else None


def first_step_at_least(steps, k: int):
    """The first step >= k, else the last step (None without steps)."""
    steps = sorted(steps)
    return next((s for s in steps if s >= k), steps[-1] if steps else None)



def bootstrap_ci(xs, stat=statistics.fmean, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap CI of ``stat`` over ``xs`` (resampled with replacement, seeded)."""
    rng = random.Random(seed)
    vals = sorted(stat([rng.choice(xs) for _ in xs]) for _ in range(n))
    return vals[int(0.025 * n)], vals[int(0.975 * n) - 1]


def ratio_ci(a, b, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap CI of mean(a) / mean(b), a and b resampled independently (seeded)."""
    rng = random.Random(seed)
    vals = sorted(statistics.fmean([rng.choice(a) for _ in a]) / statistics.fmean([rng.choice(b) for _ in b])
                  for _ in range(n))
    return vals[int(0.025 * n)], vals[int(0.975 * n) - 1]


# ---------------------------------------------------------------------- across settings (meta-analysis)

@dataclass(frozen=True)
class RandomEffects:
    """A random-effects estimate over k settings: DerSimonian-Laird between-setting variance ``tau2``,
    inverse-variance weights 1/(v_i + tau2). ``lo``/``hi``: the 95% CI with the Hartung-Knapp-Sidik-Jonkman
    standard error and Student t (k - 1 df), the interval to read with few settings; ``lo_z``/``hi_z``: the
    plain DL normal interval (narrower). ``i2``: the share of the spread beyond sampling error."""

    k: int
    mean: float
    tau2: float
    q: float  # Cochran's Q (fixed-effect weights)
    i2: float
    se: float  # DL standard error, sqrt(1 / sum w*)
    lo_z: float
    hi_z: float
    se_hk: float | None  # HKSJ standard error (None for k = 1)
    lo: float | None
    hi: float | None

    @property
    def tau(self) -> float:
        """The between-setting SD of the true effects."""
        return math.sqrt(self.tau2)


def random_effects(estimates, variances) -> RandomEffects:
    """DerSimonian-Laird random effects of per-setting ``estimates`` with their sampling ``variances``
    (e.g. a setting's mean paired difference and its SD^2 / n). Every variance must be > 0."""
    y, v = [float(x) for x in estimates], [float(x) for x in variances]
    if not y or len(y) != len(v):
        raise ValueError(f"random_effects: {len(y)} estimates and {len(v)} variances; need k >= 1 of each")
    if min(v) <= 0:
        raise ValueError("random_effects: every sampling variance must be > 0 (a setting with n >= 2 distinct values)")
    k = len(y)
    w = [1 / x for x in v]
    fixed = sum(wi * yi for wi, yi in zip(w, y)) / sum(w)
    q = sum(wi * (yi - fixed) ** 2 for wi, yi in zip(w, y))
    c = sum(w) - sum(wi * wi for wi in w) / sum(w)
    tau2 = max(0.0, (q - (k - 1)) / c) if k > 1 else 0.0
    ws = [1 / (x + tau2) for x in v]
    mean = sum(wi * yi for wi, yi in zip(ws, y)) / sum(ws)
    se = math.sqrt(1 / sum(ws))
    i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    se_hk = lo = hi = None
    if k > 1:
        se_hk = math.sqrt(sum(wi * (yi - mean) ** 2 for wi, yi in zip(ws, y)) / ((k - 1) * sum(ws)))
        t = t_quantile_975(k - 1)
        lo, hi = mean - t * se_hk, mean + t * se_hk
    return RandomEffects(k=k, mean=mean, tau2=tau2, q=q, i2=i2, se=se, lo_z=mean - 1.959964 * se,
                         hi_z=mean + 1.959964 * se, se_hk=se_hk, lo=lo, hi=hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test of paired binary outcomes: ``b`` pairs where only the first arm
    succeeded, ``c`` where only the second did; the binomial(b + c, 1/2) probability of a split at
    least as uneven. 1.0 without discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
