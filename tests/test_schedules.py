import math

import pytest

from trb_exp.schedules import SCHEDULES, AdaptiveBudget, adaptive_budgets, budget_at


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
    assert set(SCHEDULES) == {"linear", "cosine", "exponential", "step", "constant", "none", "gap", "reward"}


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="schedule.name"):
        budget_at(0, "warp", 0.1, 5)
    with pytest.raises(ValueError, match="schedule.eps0"):
        budget_at(0, "linear", -0.1, 5)
    assert math.isfinite(budget_at(10**9, "exponential", 1.0, 3))


def test_gap_schedule_on_a_scripted_history():
    # g_0 = 2 sets the scale; EMA 0.9: 2, 1.9 (g=1), 1.71 (g=0), 1.539 (g=0) ...; h = 0.5:
    # eps = eps0 * clip((ema/2 - 0.5)/0.5, 0, 1) = eps0 * (ema - 1), never increasing, 0 absorbing
    got = adaptive_budgets("gap", 1.0, [2.0, 1.0, 0.0, 0.0, 5.0], [0.0] * 5, handover=0.5)
    assert got == pytest.approx([1.0, 1.0, 0.9, 0.71, 0.539, 0.539], abs=1e-12)  # the 5.0 spike cannot raise it
    # the gap rising above its first value never raises the budget above eps0; reaching h*g0 ends it for good
    assert adaptive_budgets("gap", 0.5, [1.0, 3.0], [0, 0]) == [0.5, 0.5, 0.5]
    low = adaptive_budgets("gap", 0.5, [1.0] + [0.0] * 7 + [10.0] * 3, [0.0] * 11)
    assert low[7] == pytest.approx(0.5 * (0.9**6 - 0.5) / 0.5) and low[8] == 0.0 and low[-1] == 0.0


def test_reward_schedule_on_a_scripted_history():
    # r* = 0.25: r = 0 doubles, r = r* keeps, r = 2 r* halves; capped at 4 * eps0; below eps0/50 -> 0 for good
    got = adaptive_budgets("reward", 0.5, [0.0] * 6, [0.0, 0.0, 0.0, 0.25, 0.5, 0.125], target_reward=0.25)
    assert got == pytest.approx([0.5, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0 * 2**0.5])
    fall = adaptive_budgets("reward", 0.5, [0.0] * 8, [1.0] * 6 + [0.0] * 2, target_reward=0.25)
    assert fall[:2] == pytest.approx([0.5, 0.5 / 8]) and fall[2:] == [0.0] * 7  # 0.5/64 < 0.5/50: hand-over, for good
    rel = adaptive_budgets("reward", 0.4, [0.0] * 3, [0.0] * 3, relative=True)
    assert rel == pytest.approx([0.4, 0.8, 1.0, 1.0])  # a relative budget is a fraction: capped at 1


def test_adaptive_budget_state_round_trip_and_errors():
    a = AdaptiveBudget("gap", 0.3)
    for g in (2.0, 1.5, 1.2):
        a.observe(g, 0.0)
    b = AdaptiveBudget("gap", 0.3)
    b.load_state_dict(a.state_dict())
    assert [a.observe(1.0, 0.0), a.observe(0.9, 0.0)] == [b.observe(1.0, 0.0), b.observe(0.9, 0.0)]
    assert b(5) == a.eps
    with pytest.raises(ValueError, match="schedule.name='linear': the adaptive schedules are gap, reward"):
        AdaptiveBudget("linear", 0.3)
    with pytest.raises(ValueError, match="non-finite gap nan"):
        AdaptiveBudget("gap", 0.3).observe(float("nan"), 0.0)
    with pytest.raises(ValueError, match="schedule.name='gap' is adaptive"):
        budget_at(0, "gap", 0.3, 5)
