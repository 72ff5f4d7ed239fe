"""trb_exp.compare: the maths (CI, paired differences, best checkpoint, steps-to-target) on hand-computed
values, the report on synthetic run dirs, and one tiny end-to-end comparison of two real trainings."""

import json
import math

import pytest
from conftest import compose
from omegaconf import OmegaConf

from trb_exp import compare as C


# ------------------------------------------------------------------------------------------ maths


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 10, 29, 30, 31, 50, 200):
        assert C.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-5)


def test_mean_ci_by_hand():
    mean, half, n = C.mean_ci([0.1, 0.2, 0.3])
    assert n == 3 and mean == pytest.approx(0.2)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)  # ≈ 0.2484
    assert half == pytest.approx(4.303 * 0.1 / 1.732, rel=1e-3)
    assert C.mean_ci([0.5]) == (0.5, None, 1)
    with pytest.raises(ValueError, match="mean_ci of no values"):
        C.mean_ci([])


def test_paired_difference_pairs_by_seed():
    trb = {2: 0.9, 0: 0.5, 1: 0.7, 5: 0.99}  # seed 5 has no OPD partner
    opd = {1: 0.6, 0: 0.2, 2: 0.4, 7: 0.0}  # seed 7 has no TRB partner
    d = C.paired_difference(trb, opd)
    assert d["seeds"] == [0, 1, 2]
    assert d["diffs"] == pytest.approx([0.3, 0.1, 0.5])
    m, h, n = C.mean_ci([0.3, 0.1, 0.5])
    assert (d["mean"], d["half"], d["n"]) == (pytest.approx(m), pytest.approx(h), 3)
    assert d["mean"] == pytest.approx(0.3) and d["half"] == pytest.approx(4.302653 * 0.2 / math.sqrt(3), rel=1e-6)
    assert C.paired_difference({0: 1.0}, {1: 1.0})["n"] == 0


def test_best_checkpoint_and_ties():
    c = [{"value": 0.4, "step": 10, "config": "b", "seed": 0, "run": "x"},
         {"value": 0.6, "step": 30, "config": "b", "seed": 1, "run": "y"},
         {"value": 0.6, "step": 20, "config": "c", "seed": 0, "run": "z"}]
    assert C.best_checkpoint(c)["run"] == "z"  # tie on value: the earlier step
    assert C.best_checkpoint([]) is None


def test_steps_to_target_and_steps():
    assert C.steps_to_target([20, 0, 10, 30], [0.8, 0.0, 0.5, 0.9], 0.75) == 20  # in step order
    assert C.steps_to_target([0, 10], [0.1, 0.2], 0.5) is None
    assert C.steps_to_target([0, 10], [0.1, 0.5], 0.5) == 10  # reaching = >=
    assert C.steps_to_target([0, 10], [0.1, 0.6], 0.8 * 0.75) == 10  # 0.6000000000000001: float noise
    assert C.first_step_at_least([0, 10, 20, 30], 15) == 20
    assert C.first_step_at_least([0, 10], 15) == 10
    assert C.closest_step([0, 10, 20], 15) == 10 and C.closest_step([0, 10, 20], 16) == 20


# ----------------------------------------------------------------------------------- synthetic runs


def _write_run(d, method, seed, curve, *, eps0=0.5, k=20, max_steps=40, benches=None, train_s=12.5, budget=None,
               environment=None):
    """A run dir as train.run + Hydra write it: metrics.jsonl, summary.json, .hydra/config.yaml."""
    d.mkdir(parents=True)
    cfg = {"seed": seed, "method": {"name": method, "loss": "reverse_kl", "topk": 16},
           "schedule": {"name": "linear", "eps0": eps0, "warmup_steps": k, "budget": "absolute"},
           "trainer": {"max_steps": max_steps, "eval_every": 10}, "logger": {"backend": "none"}}
    (d / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(cfg), d / ".hydra" / "config.yaml")
    rows = []
    for step in range(1, max_steps + 1):
        row = {"step": step, "train/loss": 1.0 / step, "time/step_s": 2.0 if step <= k else 1.0, "trb/eps": 0.0}
        if method == "trb" if budget is None else budget:  # its rule logged a budget: it read the schedule
            eps = eps0 * max(0.0, 1 - (step - 1) / k)
            row.update({"trb/eps": eps, "trb/beta_mean": eps, "trb/kl_behavior_student_mean": eps / 2,
                        "rollout/teacher_entropy": 0.3})
        rows.append(row)
    for step, v in curve.items():
        row = {"step": step, "eval/pass@1": v, "eval/greedy_acc": v}
        for b, off in (benches or {}).items():
            row[f"eval/{b}/pass@1"] = v + off
        rows.append(row)
    rows.sort(key=lambda r: r["step"])
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"method": method, "seed": seed, "steps": max_steps, "train_s": train_s,
               "initial": {"step": 0, "eval/pass@1": curve[0]},
               "final": {"step": max_steps, "eval/pass@1": curve[max_steps]},
               "peak_rss_mb": 100.0}
    if environment is not None:
        summary["env"] = environment
    (d / "summary.json").write_text(json.dumps(summary))


# pass@1 at steps 0, 10, 20, 30, 40 per (method, eps0, seed)
CURVES = {
    ("trb", 0.5, 0): [0.0, 0.30, 0.50, 0.60, 0.70],
    ("trb", 0.5, 1): [0.0, 0.20, 0.40, 0.55, 0.60],
    ("trb", 0.5, 2): [0.0, 0.25, 0.45, 0.65, 0.65],
    ("trb", 1.0, 0): [0.0, 0.40, 0.60, 0.91, 0.70],  # the best TRB checkpoint: eps0=1.0, seed 0, step 30
    ("trb", 1.0, 1): [0.0, 0.35, 0.55, 0.60, 0.62],
    ("opd", None, 0): [0.0, 0.10, 0.30, 0.50, 0.60],
    ("opd", None, 1): [0.0, 0.10, 0.20, 0.45, 0.50],
    ("opd", None, 2): [0.0, 0.05, 0.25, 0.50, 0.52],
}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    for i, ((method, eps0, seed), vals) in enumerate(sorted(CURVES.items(), key=str)):
        # opd runs of one sweep carry varying schedule values they never read: still one configuration
        _write_run(root / f"{i}_method={method},seed={seed}", method, seed, dict(zip(range(0, 50, 10), vals)),
                   eps0=eps0 if eps0 is not None else [0.5, 1.0][seed % 2], benches={"math500": 0.05, "aime24": -0.05},
                   train_s=10.0 + i)
    (root / "not_a_run").mkdir()
    (root / "not_a_run" / "metrics.jsonl").write_text("")  # no .hydra/config.yaml: ignored
    return root


def test_grouping(sweep):
    runs = [C.load_run(p, p.name) for p in C.find_run_dirs([sweep])]
    assert len(runs) == 8
    groups = C.group_runs(runs)
    assert list(groups) == ["opd", "trb"]
    assert list(groups["opd"]) == ["default"] and [r.seed for r in groups["opd"]["default"]] == [0, 1, 2]
    trb = list(groups["trb"])
    assert len(trb) == 2 and all("schedule.warmup_steps=20" in c for c in trb)
    assert "schedule.eps0=0.5" in trb[0] and "schedule.eps0=1" in trb[1]


@pytest.mark.slow
def test_report(sweep, tmp_path):
    out = tmp_path / "cmp"
    path = C.compare([sweep], out, teacher_pass1=0.75, target_frac=0.8)
    md = path.read_text()
    # Table 1 protocol: the best checkpoint across both trb configs, with its per-benchmark pass@1
    table1 = md.split("## Best checkpoint per family")[1].split("\n## ")[0]
    best = next(line for line in table1.splitlines() if line.startswith("| trb |") and "0.910" in line)
    assert "| 0.860 | 0.960 | 0.910 |" in best  # aime24, math500, average (benchmarks sorted)
    assert "schedule.eps0=1" in best and "| 0 | 30 |" in best
    opd = next(line for line in table1.splitlines() if line.startswith("| opd |") and "| 0.600 |" in line)
    assert "| 0.550 | 0.650 | 0.600 | `default` | 0 | 40 |" in opd
    # final step, trb eps0=0.5 over 3 seeds: [0.70, 0.60, 0.65]
    m, h, _ = C.mean_ci([0.70, 0.60, 0.65])
    assert f"{m:.3f} ± {h:.3f}" in md
    # paired TRB(eps0=0.5) − OPD at the final step: seeds 0,1,2 → 0.10, 0.10, 0.13
    d = C.paired_difference({0: 0.70, 1: 0.60, 2: 0.65}, {0: 0.60, 1: 0.50, 2: 0.52})
    assert f"{d['mean']:+.3f} ± {d['half']:.3f}" in md and "0: +0.100, 1: +0.100, 2: +0.130" in md
    # at the end of warmup (K = 20, evaluated): trb [0.5,0.4,0.45] − opd [0.3,0.2,0.25] = 0.2 each
    assert "warmup (step ~20)" in md and "0: +0.200, 1: +0.200, 2: +0.200" in md
    # steps to 0.8 × 0.75 = 0.6: opd seed mean [.., 0.483, 0.540] never; trb eps0=0.5 mean at 30 = 0.6
    assert "= 0.600" in md
    assert "| opd | `default` | 3 | — | 0: 40, 1: —, 2: — |" in md
    assert "0: 30, 1: 40, 2: 30 |" in md
    # wall clock: 2 s during warmup, 1 s after
    assert "| 2.000 | 1.000 |" in md
    # plots exist, are PNGs, and are linked
    for name in ("headline_curves.png", "learning_curves.png", "sweeps.png", "trb_diagnostics.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    # deterministic: a second run reproduces the report byte for byte
    first = path.read_bytes()
    C.compare([sweep], out, teacher_pass1=0.75, target_frac=0.8)
    assert path.read_bytes() == first


def test_headline_config():
    class R:
        def __init__(self, final):
            self.evals = {0: None, 10: None}
            self.final = final

        def pass1(self, step):
            return self.final

    cfgs = {"a": [R(0.9), R(0.9)], "b": [R(0.1), R(0.2), R(0.3)], "c": [R(1.0)]}
    assert C.headline_config(cfgs) == "b"  # the most seeds, not the best score
    cfgs["d"] = [R(0.5), R(0.5), R(0.5)]
    assert C.headline_config(cfgs) == "d"  # same seeds: the higher mean final
    assert C.headline_config({"c": [R(1.0)]}) is None


@pytest.mark.slow
def test_summary_ci_seeds_and_other_families(sweep, tmp_path):
    # a third family, veto, seeds 0..2: final 0.55, 0.40, 0.62 against OPD's 0.60, 0.50, 0.52
    for seed, final in enumerate([0.55, 0.40, 0.62]):
        _write_run(sweep / f"veto_{seed}", "veto", seed, {0: 0.0, 10: 0.1, 20: 0.2, 30: 0.3, 40: final})
    md = C.compare([sweep], tmp_path / "o", ci_seeds={1, 2}).read_text()
    assert "use seeds {1, 2} only" in md
    summary = md.split("## Summary")[1].split("\n## ")[0]
    # trb headline = eps0=0.5 (3 runs; 2 after the seed filter): seeds 1, 2 final [0.60, 0.65]
    m, h, _ = C.mean_ci([0.60, 0.65])
    d = C.paired_difference({1: 0.60, 2: 0.65}, {1: 0.50, 2: 0.52})
    row = next(line for line in summary.splitlines() if line.startswith("| trb |"))
    assert f"| 2 | {m:.3f} ± {h:.3f} | {d['mean']:+.3f} ± {d['half']:.3f} (n=2) | 0.910 (step 30) |" in row
    # every other family − OPD, paired by seed (seeds 1, 2 only): -0.10, +0.10
    d = C.paired_difference({1: 0.40, 2: 0.62}, {1: 0.50, 2: 0.52})
    assert f"| veto | `default` | 2 | 1: -0.100, 2: +0.100 | {d['mean']:+.3f} ± {d['half']:.3f} |" in md
    # the paper-protocol table still reads every seed: trb's best is seed 0's 0.91
    assert "| 0.910 | `schedule.eps0=1" in md
    # sweeps: both trb configurations with their best checkpoint and final seed mean (all seeds)
    assert "| trb | `schedule.eps0=1,schedule.name=linear,schedule.warmup_steps=20` | 2 | 0.910 (step 30) | 0.660 |" in md


def test_label_names_knobs_set_on_the_command_line(tmp_path):
    """A family with one configuration is labelled by the knobs its runs set, not as `default`."""
    for seed in (0, 1):
        d = tmp_path / "runs" / f"veto_{seed}"
        _write_run(d, "veto", seed, {0: 0.0, 10: 0.2, 20: 0.3, 30: 0.4, 40: 0.5})
        cfg = OmegaConf.load(d / ".hydra" / "config.yaml")
        cfg.method.b_start = 0.8
        OmegaConf.save(cfg, d / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create(["method=veto", "method.b_start=0.8", f"seed={seed}", "logger=none"]),
                       d / ".hydra" / "overrides.yaml")
    _write_run(tmp_path / "runs" / "opd_0", "opd", 0, {0: 0.0, 10: 0.2, 20: 0.3, 30: 0.4, 40: 0.5})
    groups = C.group_runs([C.load_run(p, p.name) for p in C.find_run_dirs([tmp_path / "runs"])])
    assert list(groups["veto"]) == ["method.b_start=0.8"] and len(groups["veto"]["method.b_start=0.8"]) == 2
    assert list(groups["opd"]) == ["default"]


@pytest.mark.slow
def test_paper_table_rendered(sweep, tmp_path, capsys):
    paper = json.loads((C.Path(__file__).parents[1] / "docs" / "results" / "paper_table1.json").read_text())
    out = tmp_path / "p"
    C.main([str(sweep), "--out", str(out), "--paper", str(C.Path(__file__).parents[1] / "docs" / "results" /
                                                             "paper_table1.json")])
    md = (out / "comparison.md").read_text()
    assert "### The paper's published numbers (for comparison; not produced by this code)" in md
    assert "| TRB | 33.2 | 69.7 | 34.3 | 44.8 | 10.2 | 6.9 |" in md
    assert "| Vanilla OPD | 44.0 | 69.9 | 53.1 | 21.8 | 31.1 |" in md
    assert paper["source"] in md
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error: exit status 2, message on stderr
        C.main([str(sweep), "--out", str(out), "--ci-seeds", "1,x"])
    assert "--ci-seeds='1,x': give integers separated by commas" in capsys.readouterr().err


@pytest.mark.slow
def test_report_without_teacher_and_cli(sweep, tmp_path, capsys):
    _write_run(sweep / "still_running", "opd", 9, {0: 0.0, 10: 0.99, 40: 0.99})
    (sweep / "still_running" / "summary.json").unlink()  # a run in progress: left out, and said so
    C.main([str(sweep), "--out", str(tmp_path / "o")])
    md = (tmp_path / "o" / "comparison.md").read_text()
    assert "8 runs, 2 method families" in md and "still_running" not in md
    assert "skipping 1 unfinished run(s)" in capsys.readouterr().err
    assert "Skipped: no teacher pass@1 given" in md
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        C.compare([tmp_path / "empty"], tmp_path / "o2")
    assert str(e.value) == (f"error: no run (metrics.jsonl + .hydra/config.yaml) under {tmp_path / 'empty'}; give run "
                            "directories or a data file (runs.jsonl.gz)")
    with pytest.raises(SystemExit) as e:
        C.compare([tmp_path / "missing"], tmp_path / "o2")
    assert str(e.value) == f"error: {tmp_path / 'missing'}: no such run directory or data file"
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------ end to end

FAST = ["logger=none", "trainer.max_steps=2", "trainer.eval_every=1", "trainer.eval_size=4",
        "trainer.eval_samples=1", "trainer.prompts_per_step=2", "trainer.max_new_tokens=8", "threads=1",
        "trainer.save_student=false", "schedule.warmup_steps=1"]


@pytest.mark.slow
def test_end_to_end_two_real_runs(tiny_pair, tmp_path):
    from trb_exp.trainer import run

    pair = [f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}"]
    for method in ("opd", "trb"):
        cfg = compose([f"method={method}", *FAST, *pair])
        d = tmp_path / "sweep" / method
        run(cfg, d)
        (d / ".hydra").mkdir()
        OmegaConf.save(cfg, d / ".hydra" / "config.yaml")  # run() called directly does not write .hydra
    path = C.compare([tmp_path / "sweep"], tmp_path / "out", teacher_pass1=0.9)
    md = path.read_text()
    assert "2 runs, 2 method families" in md
    assert "| opd |" in md and "| trb |" in md and "schedule.warmup_steps=1" in md
    assert "No configuration has >= 2 seeds." in md and "No trb and opd configurations sharing >= 2 seeds." in md
    assert (tmp_path / "out" / "learning_curves.png").stat().st_size > 0
    assert (tmp_path / "out" / "trb_diagnostics.png").stat().st_size > 0


@pytest.mark.slow
def test_focus_and_baseline_are_arguments(tmp_path, capsys):
    """--focus/--baseline pick the report's subject and reference families; the warmup horizon and the
    schedule knobs in a label come from what a run logged (a budget), not from its method's name."""
    root = tmp_path / "runs"
    curves = {"fixed_blend": [0.0, 0.3, 0.5, 0.6, 0.7], "skd": [0.0, 0.1, 0.2, 0.4, 0.5], "opd": [0.0, 0.1, 0.3, 0.5, 0.6]}
    for method, vals in curves.items():
        for seed in range(3):
            _write_run(root / f"{method}_{seed}", method, seed, dict(zip(range(0, 50, 10), [v + 0.01 * seed for v in vals])),
                       k=20, budget=method == "fixed_blend")
    C.main([str(root), "--out", str(tmp_path / "out"), "--focus", "fixed_blend", "--baseline", "skd"])
    md = (tmp_path / "out" / "comparison.md").read_text()
    label = "schedule.eps0=0.5,schedule.name=linear,schedule.warmup_steps=20"  # fixed_blend logged a budget
    assert f"| fixed_blend | `{label}` | 3 |" in md and "| skd | `default` | 3 |" in md
    assert "− SKD, paired (mean ± 95% CI)" in md and "OPD" not in md and "TRB's" not in md
    assert "### pass@1 at the end of FIXED_BLEND's warmup" in md
    assert f"| `{label}` (step 20) | skd | `default` | 3 | 20 |" in md
    assert "### Paired difference FIXED_BLEND − SKD (per seed)" in md
    assert f"| `{label}` | `default` | final | 3 | 0: +0.200, 1: +0.200, 2: +0.200 | +0.200 ± 0.000 |" in md
    assert "### Paired difference, every other family − SKD (`default`), final step" in md
    assert "| opd | `default` | 3 | 0: +0.100, 1: +0.100, 2: +0.100 | +0.100 ± 0.000 |" in md
    assert "| fixed_blend | `" + label + "` | 0 | 12.5 | 20 | 2.000 | 1.000 |" in md  # K = its schedule.warmup_steps
    assert "| opd | `default` | 0 | 12.5 | 20 | 2.000 | 1.000 |" in md  # no K of its own: the focus's smallest
    # the default roles on the same runs: no trb, so no warmup reference; every family paired against opd
    C.main([str(root), "--out", str(tmp_path / "out2")])
    md2 = (tmp_path / "out2" / "comparison.md").read_text()
    assert "No trb runs: no warmup step to compare at." in md2 and "− OPD, paired (mean ± 95% CI)" in md2


# ------------------------------------------------------------------------------ committed reports


COMMITTED = sorted(p.parent for p in (C.Path(__file__).parents[1] / "docs" / "results").rglob("comparison.md"))
# figures that do not re-render byte for byte (none since mini's two trb_diagnostics.png were re-drawn)
NOT_REPRODUCIBLE: set[str] = set()


@pytest.mark.slow
@pytest.mark.parametrize("report", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_reports_reproduce_byte_for_byte(report, tmp_path, monkeypatch):
    """Each committed study report, and its figures, is exactly what its own footer command writes from the
    study's committed data file."""
    import shlex

    md = (report / "comparison.md").read_text()
    command = md.rstrip().splitlines()[-1]
    assert command.startswith("Generated by `python -m trb_exp.compare ") and command.endswith("`")
    argv = shlex.split(command[len("Generated by `python -m trb_exp.compare "):-1])
    assert argv[0] == str((report / "runs.jsonl.gz").relative_to(C.Path(__file__).parents[1]))  # the data file
    i = argv.index("--out")
    assert (C.Path(__file__).parents[1] / argv[i + 1]).resolve() == report.resolve()
    committed_out, argv[i + 1] = argv[i + 1], str(tmp_path)
    monkeypatch.chdir(C.Path(__file__).parents[1])
    C.main(argv)
    fresh = (tmp_path / "comparison.md").read_text()
    assert fresh == md.replace(f"--out {committed_out} ", f"--out {shlex.quote(str(tmp_path))} ")
    figures = sorted(p.name for p in report.glob("*.png"))
    assert figures == sorted(p.name for p in tmp_path.glob("*.png")) and figures
    for name in figures:
        if f"{report.name}/{name}" not in NOT_REPRODUCIBLE:
            assert (tmp_path / name).read_bytes() == (report / name).read_bytes(), name
    assert len(COMMITTED) >= 3  # the preliminary study and both miniature settings


def test_compare_warns_across_isas_and_versions(tmp_path, capsys):
    env = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "cpu_capability": "AVX512", "threads": 1, "gpu": None,
           "commit": "abc", "dirty": False}
    curve = {0: 0.0, 10: 0.2, 20: 0.3, 30: 0.4, 40: 0.5}
    _write_run(tmp_path / "runs" / "a", "opd", 0, curve, environment=env)
    _write_run(tmp_path / "runs" / "b", "trb", 0, curve, environment={**env, "cpu_capability": "AVX2"})
    _write_run(tmp_path / "runs" / "c", "trb", 1, curve)  # a run from before the record: not counted
    C.main([str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
    lines = [x for x in capsys.readouterr().err.splitlines() if "environments" in x]
    assert lines == ["[compare] warning: the runs were made in different environments (cpu_capability AVX2 vs "
                     "AVX512): their values agree bit for bit only within one ISA and library versions"]
    _write_run(tmp_path / "same" / "a", "opd", 0, curve, environment=env)
    _write_run(tmp_path / "same" / "b", "trb", 0, curve, environment={**env, "threads": 2, "commit": "def"})
    C.main([str(tmp_path / "same"), "--out", str(tmp_path / "o2")])
    assert "environments" not in capsys.readouterr().err  # threads and commit do not change the bits


def test_train_minutes_at_evals_sums_the_step_times_up_to_each_evaluation(tmp_path):
    """Logged step k + 1 is training step k: the evaluation at step s comes after logged steps 1..s."""
    from pathlib import Path

    from trb_exp.analysis.runs import Run, train_minutes_at_evals

    train = [{"step": k, "train/loss": 1.0, "time/step_s": 6.0 * k} for k in range(1, 5)]  # 6, 12, 18, 24 s
    run = Run(path=Path(tmp_path), rel="r", method="opd", seed=0, cfg={}, evals={0: {}, 2: {}, 4: {}},
              train=train, summary={})
    assert train_minutes_at_evals(run) == {0: 0.0, 2: (6 + 12) / 60, 4: (6 + 12 + 18 + 24) / 60}
    assert train_minutes_at_evals(Run(path=Path(tmp_path), rel="r", method="opd", seed=0, cfg={},
                                      evals={0: {}}, train=[{"step": 1, "train/loss": 1.0}], summary={})) == {}
