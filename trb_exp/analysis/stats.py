"""Statistics for comparing runs: pure functions on numbers, no I/O.

Student-t confidence intervals without scipy, paired per-seed differences, the best checkpoint of a
sweep (the paper's protocol), steps to a target, and a bootstrap CI for step-time ratios.
"""

from __future__ import annotations

import math
import random
import statistics

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
