"""trb_exp.analysis.stats: the bootstrap CIs used by the overhead benchmark, on cases with known answers."""

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
