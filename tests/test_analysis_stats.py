"""trb_exp.analysis.stats: the bootstrap CIs used by the overhead benchmark, on cases with known answers."""

import math
import statistics

import pytest

from trb_exp.analysis.stats import bootstrap_ci, ratio_ci


def test_bootstrap_of_a_constant_is_the_constant_and_seeded():
    assert bootstrap_ci([0.7] * 9) == (0.7, 0.7)
    assert ratio_ci([2.0] * 5, [0.5] * 4) == (4.0, 4.0)
    xs = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3]
    assert bootstrap_ci(xs, seed=3) == bootstrap_ci(xs, seed=3) != bootstrap_ci(xs, seed=4)


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    small = [float(i % 7) for i in range(14)]
    large = small * 20
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < statistics.fmean(small) < hi_s and lo_l < statistics.fmean(large) < hi_l
    # the CI of the mean shrinks like 1/sqrt(n): 20x the data, about 1/sqrt(20) of the width
    assert (hi_l - lo_l) / (hi_s - lo_s) == pytest.approx(20 ** -0.5, rel=0.35)
    lo, hi = ratio_ci([2.0, 2.2, 1.8, 2.1], [1.0, 1.1, 0.9, 1.0])
    assert lo < 2.0 < hi and hi - lo < 0.6


# ---------------------------------------------------------------------- random effects, exact McNemar
def test_random_effects_equal_variances_reduce_to_the_t_interval_over_settings():
    from trb_exp.analysis.stats import mean_ci, random_effects

    y, v = [0.08, -0.04, 0.02, 0.10, -0.01], 0.0004
    re = random_effects(y, [v] * 5)
    mean, half, _ = mean_ci(y)
    s2 = sum((x - mean) ** 2 for x in y) / 4
    assert re.tau2 == pytest.approx(s2 - v)  # DL with equal variances: sample variance minus v
    assert re.mean == pytest.approx(mean)
    assert (re.lo, re.hi) == (pytest.approx(mean - half), pytest.approx(mean + half))  # HKSJ = Student t over y
    assert re.tau == pytest.approx(math.sqrt(s2 - v))
    assert re.i2 == pytest.approx((re.q - 4) / re.q) and re.q == pytest.approx(4 * s2 / v)


def test_random_effects_against_a_direct_computation():
    np = pytest.importorskip("numpy")
    from trb_exp.analysis.stats import random_effects

    y, v = np.array([0.082, -0.037, 0.010, 0.055]), np.array([0.00056, 0.00048, 0.0009, 0.0003])
    W = np.diag(1 / v)
    X = np.ones((4, 1))
    beta = np.linalg.solve(X.T @ W @ X, X.T @ W @ y)[0]  # weighted least squares
    Q = float((y - beta) @ W @ (y - beta))
    tau2 = max(0.0, (Q - 3) / (np.trace(W) - np.trace(W @ W) / np.trace(W)))
    Ws = np.diag(1 / (v + tau2))
    mu = np.linalg.solve(X.T @ Ws @ X, X.T @ Ws @ y)[0]
    se_hk = math.sqrt(float((y - mu) @ Ws @ (y - mu)) / 3 / np.trace(Ws))
    re = random_effects(y.tolist(), v.tolist())
    assert re.tau2 == pytest.approx(tau2) and re.mean == pytest.approx(mu) and re.se_hk == pytest.approx(se_hk)
    assert re.hi - re.mean == pytest.approx(3.182446 * se_hk)  # t(3)
    assert re.se == pytest.approx(math.sqrt(1 / np.trace(Ws)))
    same = random_effects([0.05, 0.05, 0.05], [0.001, 0.002, 0.003])
    assert same.tau2 == 0 and same.mean == pytest.approx(0.05) and same.lo == pytest.approx(0.05)
    with pytest.raises(ValueError, match="every sampling variance must be > 0"):
        random_effects([0.1, 0.2], [0.01, 0.0])


def test_mcnemar_exact_against_the_binomial():
    stats = pytest.importorskip("scipy.stats")
    from trb_exp.analysis.stats import mcnemar_exact

    for b, c in [(0, 3), (3, 0), (1, 6), (5, 5), (2, 9), (0, 10)]:
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 3) == pytest.approx(0.25)  # 2 * (1/2)^3
