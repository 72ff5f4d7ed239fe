"""Every conf/schedule/*.yaml composes through Hydra into a Method whose budget follows
schedules.budget_at, with overrides of eps0 / warmup_steps / budget applied."""

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose

from trb_exp.methods import Method
from trb_exp.schedules import ADAPTIVE, SCHEDULES, adaptive_budgets, budget_at

STATIC = [s for s in SCHEDULES if s not in ADAPTIVE]

KEYS = {"name", "eps0", "warmup_steps", "budget"}


def test_one_config_per_schedule():
    files = sorted(p.stem for p in (Path(CONF_DIR) / "schedule").glob("*.yaml"))
    assert files == sorted(SCHEDULES)


@pytest.mark.parametrize("name", STATIC)
def test_schedule_config_composes_and_matches_budget_at(name):
    cfg = compose(["method=trb", f"schedule={name}"])
    s = cfg.schedule
    assert s.name == name
    assert KEYS <= set(s.keys()) and set(s.keys()) <= KEYS | {"final_ratio"}
    assert ("final_ratio" in s) == (name == "exponential")
    assert (Path(CONF_DIR) / "schedule" / f"{name}.yaml").read_text().startswith("# ")  # one-line comment
    method = Method.from_cfg(cfg.method, cfg.schedule)
    K, eps0 = int(s.warmup_steps), float(s.eps0)
    ratio = float(s.get("final_ratio", 0.01))
    steps = [0, 1, K // 3, K // 2, K - 1, K, K + 1, 3 * K]
    for k in steps:
        assert method.behaviour.budget(k) == pytest.approx(budget_at(k, name, eps0, K, ratio), abs=1e-15)
    if name in ("linear", "cosine", "exponential", "step"):
        assert eps0 > 0 and method.behaviour.budget(0) == pytest.approx(eps0) and method.behaviour.budget(K) == 0.0
    # a behaviour rule with a zero budget is plain student sampling
    assert (type(method.sampler(3 * K)).__name__ == "StudentSampler") == (name != "constant")


@pytest.mark.parametrize("name", STATIC)
def test_overrides_reach_the_method(name):
    cfg = compose(["method=trb", f"schedule={name}", "schedule.eps0=0.2", "schedule.warmup_steps=8",
                   "schedule.budget=relative"])
    method = Method.from_cfg(cfg.method, cfg.schedule)
    assert method.schedule.budget == "relative"
    for k in range(12):
        assert method.behaviour.budget(k) == pytest.approx(budget_at(k, name, 0.2, 8, method.schedule.final_ratio))
    if name not in ("none", "constant"):
        assert method.behaviour.budget(7) > 0 and method.behaviour.budget(8) == 0.0


def test_exponential_final_ratio_override():
    cfg = compose(["method=trb", "schedule=exponential", "schedule.eps0=1.0", "schedule.warmup_steps=10",
                   "schedule.final_ratio=0.1"])
    method = Method.from_cfg(cfg.method, cfg.schedule)
    assert method.behaviour.budget(5) == pytest.approx(0.1**0.5)
    assert method.behaviour.budget(10) == 0.0


def test_opd_ignores_the_schedule():
    cfg = compose(["method=opd", "schedule=constant"])
    method = Method.from_cfg(cfg.method, cfg.schedule)
    assert method.behaviour.schedule is None  # the student rule reads no schedule
    assert all(method.diagnostics(k)["trb/eps"] == 0.0 and type(method.sampler(k)).__name__ == "StudentSampler" for k in (0, 10, 100))


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_config_composes_and_follows_the_observations(name):
    cfg = compose(["method=trb", f"schedule={name}", "schedule.eps0=0.4"])
    s = cfg.schedule
    knob = {"gap": "handover", "reward": "target_reward"}[name]
    assert set(s.keys()) == KEYS | {knob}
    assert (Path(CONF_DIR) / "schedule" / f"{name}.yaml").read_text().startswith("# ")
    method = Method.from_cfg(cfg.method, cfg.schedule)
    gaps, rewards = [3.0] + [0.1] * 9, [0.0, 0.1, 0.3, 0.6, 0.8] + [0.9] * 5
    want = adaptive_budgets(name, 0.4, gaps, rewards, **{knob: float(s[knob])})
    got = []
    for k, (g, r) in enumerate(zip(gaps, rewards)):
        got.append(method.behaviour.budget(k))
        assert type(method.sampler(k)).__name__ == ("TrustRegionSampler" if got[-1] > 0 else "StudentSampler")
        method.observe(g, r)
    got.append(method.behaviour.budget(len(gaps)))
    assert got == want and got[0] == 0.4 and got[-1] == 0.0
    with pytest.raises(RuntimeError, match="asked for step 3's budget after 10 observations"):
        method.behaviour.budget(3)


def test_adaptive_knobs_are_validated():
    from trb_exp.config import ConfigError

    with pytest.raises(ConfigError, match=r"schedule.handover=1.0: the hand-over fraction"):
        Method.from_cfg(*(lambda c: (c.method, c.schedule))(compose(["method=trb", "schedule=gap", "schedule.handover=1.0"])))
    with pytest.raises(ConfigError, match=r"schedule.target_reward=0.0: a target mean reward"):
        Method.from_cfg(*(lambda c: (c.method, c.schedule))(compose(["method=trb", "schedule=reward", "schedule.target_reward=0"])))
