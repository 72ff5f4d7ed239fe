import math

import pytest

from trb_exp.schedules import SCHEDULES, budget_at


def test_linear_is_the_papers_schedule():
    K, eps0 = 25, 0.02
    got = [budget_at(k, "linear", eps0, K) for k in range(40)]
    want = [eps0 * (1 - k / K) if k < K else 0.0 for k in range(40)]
    assert got == pytest.approx(want, abs=1e-15)
    assert got[0] == eps0 and got[K] == 0.0 and got[K - 1] > 0


@pytest.mark.parametrize("name", ["linear", "cosine", "exponential", "step"])
def test_annealed_schedules_start_at_eps0_decrease_and_end_at_K(name):
    K, eps0 = 15, 0.05
    vals = [budget_at(k, name, eps0, K) for k in range(K + 5)]
    assert vals[0] == pytest.approx(eps0)
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert all(v == 0.0 for v in vals[K:]) and vals[K - 1] > 0


def test_constant_none_and_shapes():
    assert [budget_at(k, "constant", 0.01, 5) for k in (0, 5, 500)] == [0.01] * 3
    assert budget_at(0, "none", 1.0, 5) == 0.0
    assert budget_at(5, "cosine", 1.0, 10) == pytest.approx(0.5)
    assert budget_at(5, "exponential", 1.0, 10, final_ratio=0.01) == pytest.approx(0.1)
    assert set(SCHEDULES) == {"linear", "cosine", "exponential", "step", "constant", "none"}


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="schedule.name"):
        budget_at(0, "warp", 0.1, 5)
    with pytest.raises(ValueError, match="schedule.eps0"):
        budget_at(0, "linear", -0.1, 5)
    assert math.isfinite(budget_at(10**9, "exponential", 1.0, 3))
