"""Every conf/schedule/*.yaml composes through Hydra into a Method whose budget follows
schedules.budget_at, with overrides of eps0 / warmup_steps / budget applied."""

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose

from trb_exp.methods import Method
from trb_exp.schedules import SCHEDULES, budget_at

KEYS = {"name", "eps0", "warmup_steps", "budget"}


def test_one_config_per_schedule():
    files = sorted(p.stem for p in (Path(CONF_DIR) / "schedule").glob("*.yaml"))
    assert files == sorted(SCHEDULES)


@pytest.mark.parametrize("name", SCHEDULES)
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
        assert method.budget(k) == pytest.approx(budget_at(k, name, eps0, K, ratio), abs=1e-15)
    if name in ("linear", "cosine", "exponential", "step"):
        assert eps0 > 0 and method.budget(0) == pytest.approx(eps0) and method.budget(K) == 0.0
    # a behaviour rule with a zero budget is plain student sampling
    assert (type(method.rule(3 * K)).__name__ == "StudentRule") == (name != "constant")


@pytest.mark.parametrize("name", SCHEDULES)
def test_overrides_reach_the_method(name):
    cfg = compose(["method=trb", f"schedule={name}", "schedule.eps0=0.2", "schedule.warmup_steps=8",
                   "schedule.budget=relative"])
    method = Method.from_cfg(cfg.method, cfg.schedule)
    assert method.schedule.budget == "relative"
    for k in range(12):
        assert method.budget(k) == pytest.approx(budget_at(k, name, 0.2, 8, method.schedule.final_ratio))
    if name not in ("none", "constant"):
        assert method.budget(7) > 0 and method.budget(8) == 0.0


def test_exponential_final_ratio_override():
    cfg = compose(["method=trb", "schedule=exponential", "schedule.eps0=1.0", "schedule.warmup_steps=10",
                   "schedule.final_ratio=0.1"])
    method = Method.from_cfg(cfg.method, cfg.schedule)
    assert method.budget(5) == pytest.approx(0.1**0.5)
    assert method.budget(10) == 0.0


def test_opd_ignores_the_schedule():
    cfg = compose(["method=opd", "schedule=constant"])
    method = Method.from_cfg(cfg.method, cfg.schedule)
    assert all(method.budget(k) == 0.0 for k in (0, 10, 100))
