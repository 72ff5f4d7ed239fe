"""scripts/generalisation_study.py: the plan's constants, the matched control's derivation from the committed
runs, the selection rule and the run order."""

import importlib.util
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gs():
    spec = importlib.util.spec_from_file_location("generalisation_study", ROOT / "scripts" / "generalisation_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grid_is_the_sweep_preset(gs):
    params = OmegaConf.load(ROOT / "conf" / "sweep" / "trb_mini.yaml").hydra.sweeper.params
    assert tuple(float(x) for x in str(params["schedule.eps0"]).split(",")) == gs.GRID_EPS0
    assert tuple(int(x) for x in str(params["schedule.warmup_steps"]).split(",")) == gs.GRID_K


def test_matched_schedule_from_the_committed_runs(gs):
    """PLAN.md's numbers, and an independent recomputation from the metrics files."""
    plan = {"mini_a": (2.578, 129), "mini_b": (2.241, 152)}
    for s, seeds in gs.MATCHED_SEEDS.items():
        m = gs.matched_schedule(s)
        assert (m.eps0, m.K) == plan[s]
        hand, spent = [], []
        for seed in seeds:
            rows = [json.loads(x) for x in (gs.POWERED / s / "trb_reward" / f"seed_{seed}" / "metrics.jsonl")
                    .read_text().splitlines()]
            eps = [(r["step"], r["trb/eps"]) for r in rows if "train/loss" in r]
            hand.append(min(st for st, e in eps if e == 0) - 1)
            spent.append(sum(e for _, e in eps))
        hand, spent = sorted(hand), sorted(spent)
        n = len(seeds)
        med = lambda v: (v[n // 2 - 1] + v[n // 2]) / 2  # n is even (10, 6)
        assert m.K == int(med(hand) + 0.5)
        assert m.eps0 == pytest.approx(2 * med(spent) / (m.K + 1), abs=6e-4)
        # the linear schedule spends the controller's median total over the same horizon
        assert sum(m.eps0 * (1 - k / m.K) for k in range(m.K)) == pytest.approx(med(spent), rel=1e-3)


def _fake(evals=None, val=None):
    from types import SimpleNamespace
    return SimpleNamespace(evals=evals or {}, val=val or {})


def test_selection_on_validation_mean_over_seeds_and_ties(gs):
    vals = {}
    for e in gs.GRID_EPS0:
        for k in gs.GRID_K:
            for i, s in enumerate(gs.SELECTION_SEEDS):
                v = 0.1 + (0.2 if (e, k) in ((1.0, 25), (0.25, 15)) else 0.0) + 0.01 * i
                vals[gs.grid_rel(gs.SELECTION_SETTING, e, k, s)] = _fake(val={0: 0.0, 250: v})
    assert gs.selected(vals.get) == (0.25, 15)  # tie on mean val AUC: the smaller eps0 first
    vals[gs.grid_rel(gs.SELECTION_SETTING, 1.0, 25, 202)] = _fake(val={0: 0.0, 250: 0.9})
    assert gs.selected(vals.get) == (1.0, 25)
    del vals[gs.grid_rel(gs.SELECTION_SETTING, 2.0, 50, 200)]
    assert gs.selected(vals.get) is None  # not before every selection run has finished


def test_run_order_and_reuse(gs):
    matched = gs.matched_jobs()
    assert [(j.setting, j.seed) for j in matched[:3]] == [("mini_a", 100), ("mini_b", 100), ("mini_a", 101)]
    assert len(matched) == 16 and all("dataset.val_size=0" in j.overrides for j in matched)
    assert "schedule.eps0=2.578" in matched[0].overrides and "schedule.warmup_steps=129" in matched[0].overrides
    sel = gs.selection_jobs()
    assert len(sel) == 45 and [j.seed for j in sel[:16]] == [200] * 15 + [201]
    assert not any("dataset.val_size=0" in j.overrides for j in sel)  # the grid is scored on validation
    main = gs.main_jobs((1.0, 25))
    assert [j.rel for j in main[:4]] == ["mini_a/opd/seed_100", "mini_a/trb/seed_100", "mini_a/trb_sel/seed_100",
                                         "mini_b/opd/seed_100"]
    assert len(main) == 150 and len(gs.main_jobs((0.5, 50))) == 100 == len(gs.main_jobs(None))
    reused = [j.rel for j in main if gs.reused(j) is not None]
    assert len(reused) == 32 and "mini_b/opd/seed_105" in reused and "mini_b/opd/seed_106" not in reused
    assert not any(j.arm == "trb_sel" for j in main if gs.reused(j) is not None)
    cmd = gs.command(Path("/o"), main[2])
    assert cmd[1:] == ["-m", "trb_exp.train", "experiment=mini_a", "method=trb", "method.name=trb_sel", "schedule=linear",
                       "schedule.eps0=1", "schedule.warmup_steps=25", "dataset.val_size=0", "seed=100", "logger=none",
                       "threads=1", "hydra.run.dir=/o/mini_a/trb_sel/seed_100"]
