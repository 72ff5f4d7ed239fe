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


def _write(root, rel, curve, seed, wall=2.0, val=None):
    d = root / rel
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": seed}), d / ".hydra" / "config.yaml")
    rows = [{"step": s, "train/loss": 1.0, "time/step_s": wall} for s in range(1, 251)]
    for st, v in curve.items():
        rows.append({"step": st, "eval/pass@1": v, **({"val/pass@1": val[st]} if val else {})})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    (d / "summary.json").write_text(json.dumps({"train_s": 250 * wall, "env": {"commit": "abc", "cpu_capability": "AVX512"}}))


def test_report_on_synthetic_runs(gs, tmp_path):
    steps = (0, 50, 100, 150, 200, 250)
    flat = lambda v: {s: (0.0 if s == 0 else v) for s in steps}
    for seed in (100, 101, 102):
        for s, arm, v in [("mini_c", "opd", 0.2), ("mini_c", "trb", 0.3 + 0.01 * (seed - 100)),
                          ("mini_d", "opd", 0.2), ("mini_d", "trb", 0.25 - 0.02 * (seed - 100)),
                          ("mini_a", "trb_matched", 0.1)]:
            _write(tmp_path / "runs", f"{s}/{arm}/seed_{seed}", flat(v), seed)
    gs.cmd_report(type("A", (), {"runs": str(tmp_path / "runs"), "out": str(tmp_path / "r")})())
    text = (tmp_path / "r" / "README.md").read_text()
    assert "(INTERIM)" in text and "New runs made by code at commit(s) `abc`; CPU capability AVX512" in text
    # AUC of flat(v) = 0.9 v (the first trapezoid rises from 0): mini_c trb - opd = 0.9 x (0.10, 0.11, 0.12)
    assert f"| mini_c | +{0.9 * 0.11:.3f} ± " in text and "| mini_c | trb | 3 (100–102) | 0 |" in text
    runs = gs.collect([tmp_path / "runs"])
    per, re = gs.across(runs, "trb", "opd")
    assert per["mini_c"]["n"] == 3 and per["mini_a"]["n"] == 10 and re.k == 4  # mini_a, mini_b (reused), c, d
    d = gs.paired(runs, "mini_a", "trb_reward", "trb_matched", lambda r: gs.auc(r.evals))
    assert d["n"] == 3 and d["seeds"] == [100, 101, 102]
    assert "| trb_reward − trb_matched | AUC | " + gs._ci(d) + " | — |" in text
    assert "| matched | 3 | 25.0 | 8.3 |" in text  # 3 runs x 250 steps x 2 s
    assert (tmp_path / "r" / "curves_wall.png").is_file() and (tmp_path / "r" / "jumps.png").is_file()


def test_a_frozen_selection_makes_trb_sel_the_trb_arm_and_the_findings_say_so(gs, tmp_path):
    steps = (0, 50, 100, 150, 200, 250)
    for e in gs.GRID_EPS0:
        for k in gs.GRID_K:
            for seed in gs.SELECTION_SEEDS:
                best = (e, k) == (gs.FROZEN["eps0"], gs.FROZEN["K"])
                _write(tmp_path / "runs", gs.grid_rel(gs.SELECTION_SETTING, e, k, seed), {s: 0.1 for s in steps}, seed,
                       val={s: (0.4 if best else 0.2) for s in steps})
    runs = gs.collect([tmp_path / "runs"])
    assert gs.selection_of(runs) == (0.5, 50) and gs.main_arms(runs) == ("opd", "trb")
    found = "\n".join(gs.findings_section(runs, final=False))
    assert "picked eps0 = 0.5, K = 50: the frozen configuration, so `trb_sel` is the `trb` arm." in found
    # the reused powered runs: mini_a +0.082 +- 0.047 (n=10), mini_b -0.037 +- 0.045 (n=6), as in the committed report
    assert "Per setting: mini_a +0.082 ± 0.047 (n=10); mini_b -0.037 ± 0.045 (n=6)." in found
    del runs["selection"][f"eps0_2_K_50"][200]
    assert gs.selection_of(runs) is None and gs.main_arms(runs) == gs.MAIN_ARMS


def test_verdict_rules(gs):
    from trb_exp.analysis.stats import random_effects

    assert gs.verdict(random_effects([0.10, 0.12, 0.11], [1e-4] * 3)).startswith("TRB helps across settings")
    assert gs.verdict(random_effects([-0.10, -0.12, -0.11], [1e-4] * 3)).startswith("TRB hurts across settings")
    assert gs.verdict(random_effects([0.01, -0.01, 0.0], [1e-4] * 3)) == "no effect of practical size (CI inside ±0.05)"
    spread = gs.verdict(random_effects([0.2, -0.2, 0.1, -0.1], [1e-4] * 4))
    assert spread.startswith("inconclusive") and spread.endswith("the effect depends on the setting (τ ≥ 0.05)")
    assert gs.matched_verdict({"mean": 0.03, "half": 0.01}).startswith("the controller beats")
    assert gs.matched_verdict({"mean": -0.03, "half": 0.01}).startswith("the matched linear schedule beats")
    assert gs.matched_verdict({"mean": 0.0, "half": 0.03}).startswith("no difference of practical size")


def test_committed_report_re_renders_byte_for_byte(gs, tmp_path):
    root = ROOT / "docs" / "results" / "generalisation"
    gs.cmd_report(type("A", (), {"runs": str(root / "runs.jsonl.gz"), "out": str(tmp_path)})())
    body = lambda text: text.rsplit("\n---\n", 1)[0]  # the footer names the directories
    assert body((tmp_path / "README.md").read_text()) == body((root / "README.md").read_text())
    for png in ("curves.png", "curves_wall.png", "jumps.png"):
        assert (tmp_path / png).read_bytes() == (root / png).read_bytes()


def test_pairs_are_looked_up_where_the_runs_are_and_one_runner_per_out(gs, tmp_path):
    import os

    assert gs.pair_ready("a", tmp_path / "cache", ROOT) and gs.pair_ready("b", tmp_path / "cache", ROOT)
    assert not gs.pair_ready("c", tmp_path / "cache", tmp_path / "elsewhere")  # not shipped there, not in the cache
    from trb_exp.prepare import pair_spec
    built = tmp_path / "built" / "embedded_c"
    built.mkdir(parents=True)
    (built / "prepare.json").write_text(json.dumps({"key": pair_spec("c").key()}))
    gs.import_pairs(tmp_path / "built", tmp_path / "cache")
    assert gs.pair_ready("c", tmp_path / "cache", tmp_path / "elsewhere")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "runner.pid").write_text(f"{os.getpid()}\n")  # a live process holds the folder
    with pytest.raises(SystemExit, match="is running on this --out"):
        gs._lock(tmp_path / "out")
    (tmp_path / "out" / "runner.pid").write_text("999999999\n")  # a stale pid file is taken over
    gs._lock(tmp_path / "out")
    assert (tmp_path / "out" / "runner.pid").read_text() == f"{os.getpid()}\n"


def test_compute_matched_view(tmp_path):
    spec = importlib.util.spec_from_file_location("compute_matched", ROOT / "scripts" / "compute_matched.py")
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    curve = {0: 0.0, 50: 0.1, 100: 0.2, 150: 0.3, 200: 0.4, 250: 0.5}
    for arm, wall in (("opd", 1.0), ("trb", 1.5)):
        for seed, slow in ((100, 1.0), (101, 1.0), (102, 10.0)):  # a slowed run: the median ignores it
            _write(tmp_path / "runs", f"mini_a/{arm}/seed_{seed}", curve, seed, wall=wall * slow)
    cm.main([str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    md = (tmp_path / "o" / "compute_matched.md").read_text()
    assert "| mini_a | opd | 3 | 4.17 | 1.00 |" in md and "| mini_a | trb | 3 | 6.25 | 1.50 |" in md  # 250 x 1 s
    steps, p, minutes = cm.mean_curve(cm.collect(tmp_path / "runs")["mini_a"]["trb"])
    assert steps == sorted(curve) and p == pytest.approx([curve[s] for s in steps]) and minutes[-1] == 250 * 1.5 / 60
    assert (tmp_path / "o" / "compute_matched.png").is_file()


def test_start_resumes_a_checkpointed_run_and_restarts_one_without(gs, tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(gs.subprocess, "Popen", lambda cmd, **kw: launched.append((cmd, kw["cwd"])) or "proc")
    job = gs.main_jobs(None)[0]
    d = tmp_path / job.rel
    (d / "checkpoints" / "step_50").mkdir(parents=True)
    (d / "metrics.jsonl").write_text("{}\n")
    p, log, _, _ = gs.start(tmp_path, job, {}, tmp_path / "code", "/py")
    log.close()
    assert (d / "metrics.jsonl").is_file()  # kept: trainer.resume=auto continues from step_50
    assert launched[0][0][:5] == ["nice", "-n", "19", "/py", "-m"] and launched[0][1] == tmp_path / "code"
    other = gs.main_jobs(None)[1]
    (tmp_path / other.rel).mkdir(parents=True)
    (tmp_path / other.rel / "metrics.jsonl").write_text("{}\n")  # interrupted before any checkpoint
    gs.start(tmp_path, other, {}, tmp_path / "code", "/py")[1].close()
    assert not (tmp_path / other.rel).exists()  # removed: the run starts from scratch
