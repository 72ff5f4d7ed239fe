"""The powered study's mechanics (scripts/powered_study.py) on synthetic run directories: the primary
metric, complete seeds, the stopping rule, the verdicts, and a deterministic report."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import powered_study as ps  # noqa: E402

from trb_exp.analysis.runstore import pack  # noqa: E402
pytestmark = pytest.mark.slow  # tests a study script (scripts/powered_study.py)

STEPS = (0, 50, 100, 150, 200, 250)


def write_run(root: Path, setting: str, arm: str, seed: int, curve, finished=True, se=0.01):
    d = root / setting / arm / f"seed_{seed}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(f"method:\n  name: {arm}\nseed: {seed}\n")
    rows = [{"step": st, "eval/pass@1": v, "eval/pass@1_se": se} for st, v in zip(STEPS, curve)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (d / "summary.json").write_text(json.dumps({"train_s": 100.0 + seed}))


def test_auc_is_the_trapezoid_mean():
    assert ps.auc({0: 0.0, 50: 0.2, 100: 0.4}) == pytest.approx(0.2)
    assert ps.auc({0: 0.1, 100: 0.1, 250: 0.4}) == pytest.approx((0.1 * 100 + 0.25 * 150) / 250)
    with pytest.raises(ValueError, match="auc needs >= 2 evaluated steps"):
        ps.auc({0: 0.3})
    assert ps.steps_to({0: 0.0, 50: 0.31, 100: 0.2}) == 50 and ps.steps_to({0: 0.1}) is None


def flat(v):
    return [v] * len(STEPS)


def test_complete_seeds_stop_at_the_first_gap_and_unfinished_runs_do_not_count(tmp_path):
    for seed in (100, 101, 103):
        for arm in ps.ARMS:
            write_run(tmp_path, "mini_a", arm, seed, flat(0.2))
    for arm in list(ps.ARMS)[:-1]:  # seed 102 lacks its last arm; the last arm's run is unfinished
        write_run(tmp_path, "mini_a", arm, 102, flat(0.2))
    write_run(tmp_path, "mini_a", list(ps.ARMS)[-1], 102, flat(0.2), finished=False)
    runs = ps.collect(tmp_path)
    assert ps.complete_seeds(runs, "mini_a") == [100, 101]
    assert ps.complete_seeds(runs, "mini_b") == []


def study(tmp_path, n_seeds, diffs):
    for i in range(n_seeds):
        for s in ps.SETTINGS:
            for arm in ps.ARMS:
                v = 0.2 + (diffs[i] if arm != "opd" else 0.0) + 0.01 * i
                write_run(tmp_path, s, arm, ps.FIRST_SEED + i, flat(v))
    return ps.collect(tmp_path)


def test_stopping_rule_needs_five_seeds_and_the_half_width(tmp_path):
    tight = [0.01, 0.02, 0.0, 0.01, 0.015, 0.012]
    runs = study(tmp_path / "a", 4, tight)
    assert ps.stopped(runs, "mini_a") == (False, "4 seeds")  # below MIN_SEEDS: never stops
    runs = study(tmp_path / "b", 5, tight)
    d = ps.primary_difference(runs, "mini_a")
    assert d["n"] == 5 and d["mean"] == pytest.approx(sum(tight[:5]) / 5)
    stop, why = ps.stopped(runs, "mini_a")
    assert stop and why.startswith("5 seeds: half-width 0.0") and d["half"] <= ps.HALF_WIDTH
    wide = [0.3, -0.3, 0.2, -0.25, 0.1]
    assert ps.stopped(study(tmp_path / "c", 5, wide), "mini_a")[0] is False


def test_verdicts_follow_the_plan():
    per = {"mini_a": {"mean": 0.02}, "mini_b": {"mean": 0.03}}
    assert ps.verdict({"mean": 0.08, "half": 0.03}, per).startswith("TRB helps")
    assert ps.verdict({"mean": 0.08, "half": 0.03}, {"mini_a": {"mean": -0.01}, "mini_b": {"mean": 0.1}}).startswith("inconclusive")
    assert ps.verdict({"mean": -0.08, "half": 0.03}, per).startswith("TRB hurts")
    assert ps.verdict({"mean": 0.01, "half": 0.03}, per).startswith("no effect of practical size")
    assert ps.verdict({"mean": 0.01, "half": 0.2}, per).startswith("inconclusive")
    assert ps.adaptive_verdict({"mean": 0.01, "half": 0.03}).startswith("matches")
    assert ps.adaptive_verdict({"mean": 0.05, "half": 0.03}).startswith("beats")
    assert ps.adaptive_verdict({"mean": -0.05, "half": 0.03}).startswith("not shown")


def test_auc_eval_variance_uses_the_trapezoid_weights():
    rec = {"evals": {0: 0.1, 50: 0.2, 100: 0.3}, "se": {0: 0.01, 50: 0.02, 100: 0.03}}
    w = [0.25, 0.5, 0.25]
    assert ps.auc_eval_variance(rec) == pytest.approx(sum(wi**2 * s**2 for wi, s in zip(w, (0.01, 0.02, 0.03))))
    assert ps.auc_eval_variance({"evals": {0: 0.1, 50: 0.2}, "se": {0: 0.01}}) is None


def test_report_is_deterministic_and_states_the_rule(tmp_path):
    study(tmp_path / "runs", 5, [0.01, 0.02, 0.0, 0.01, 0.015])
    args = lambda out: type("A", (), {"runs": str(tmp_path / "runs"), "out": str(out)})()
    ps.cmd_report(args(tmp_path / "r1"))
    ps.cmd_report(args(tmp_path / "r1"))
    text = (tmp_path / "r1" / "README.md").read_text()
    # diffs 0.01, 0.02, 0, 0.01, 0.015: mean 0.011, sd sqrt(220e-6/4), t(4) 2.776 -> half-width 0.0092;
    # pooled over both settings (the same five twice): sd sqrt(440e-6/9), t(9) 2.262 -> 0.0050
    assert "| mini_a | 5 (100–104) | +0.011 ± 0.009 | 0.009 | stopped: 5 seeds: half-width 0.0092 <= 0.05 |" in text
    assert "| trb − opd | +0.011 ± 0.009 (n=5) | +0.011 ± 0.009 (n=5) | +0.011 ± 0.005 (n=10) |" in text
    assert "TRB helps" in text and (tmp_path / "r1" / "curves.png").stat().st_size > 1000
    png = (tmp_path / "r1" / "differences.png").read_bytes()
    ps.cmd_report(args(tmp_path / "r2"))
    assert (tmp_path / "r2" / "README.md").read_text().split("---")[0] == text.split("---")[0]
    assert (tmp_path / "r2" / "differences.png").read_bytes() == png


def test_report_states_when_each_budget_handed_over(tmp_path):
    study(tmp_path / "runs", 2, [0.01, 0.02])
    for i, handover in enumerate((60, 80)):  # append trb_gap's budget rows: 0.5 until the hand-over, then 0
        for s in ps.SETTINGS:
            path = tmp_path / "runs" / s / "trb_gap" / f"seed_{ps.FIRST_SEED + i}" / "metrics.jsonl"
            rows = [{"step": k, "train/loss": 1.0, "trb/eps": 0.5 if k < handover else 0.0} for k in range(1, 101)]
            with path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    ps.cmd_report(type("A", (), {"runs": str(tmp_path / "runs"), "out": str(tmp_path / "r")})())
    text = (tmp_path / "r" / "README.md").read_text()
    # hand-over at 60 and 80: mean 70, half-width t(1) * sd / sqrt(2) = 12.706 * 14.142 / 1.414 = 127.1
    assert "| mini_a | trb_gap | 70.0 ± 127.1 | 0.500 ± 0.000 | 0.5 |" in text


def test_runner_resumes_from_committed_and_scratch_runs(tmp_path):
    committed, scratch = tmp_path / "committed", tmp_path / "scratch"
    for arm in ps.ARMS:
        write_run(committed, "mini_a", arm, 100, flat(0.2))
    for arm in list(ps.ARMS)[:2]:
        write_run(scratch, "mini_a", arm, 101, flat(0.2))
    runs = ps.collect_all(committed, scratch)
    assert ps.complete_seeds(runs, "mini_a") == [100] and set(runs["mini_a"]["opd"]) == {100, 101}


def test_a_data_file_collects_as_its_run_directories(tmp_path):
    study(tmp_path / "runs", 2, [0.01, 0.02])
    write_run(tmp_path / "runs", "mini_b", "opd", 102, flat(0.3), finished=False)
    write_run(tmp_path / "runs", "mini_b", "not_an_arm", 100, flat(0.3))
    pack(tmp_path / "runs", tmp_path / "runs.jsonl.gz")
    runs = ps.collect(tmp_path / "runs.jsonl.gz")
    assert runs == ps.collect(tmp_path / "runs") and ps.complete_seeds(runs, "mini_b") == [100, 101]
    assert 102 not in runs["mini_b"]["opd"] and runs["mini_a"]["trb"][101]["train_s"] == 201.0
    assert ps.collect(tmp_path / "not_yet") == {s: {a: {} for a in ps.ARMS} for s in ps.SETTINGS}


def test_committed_report_re_renders_byte_for_byte(tmp_path, monkeypatch):
    """README.md and both figures, from the committed data file; the plan's commit from PLAN.commit (no git)."""
    root = Path(__file__).resolve().parents[1]
    study = root / "docs" / "results" / "powered"
    monkeypatch.chdir(root)
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-git"))  # nothing may come from the repository's history
    ps.cmd_report(type("A", (), {"runs": "docs/results/powered/runs.jsonl.gz", "out": str(tmp_path)})())
    committed = (study / "README.md").read_text()
    assert committed.endswith("--out docs/results/powered`\n")
    assert (tmp_path / "README.md").read_text() == committed.replace("--out docs/results/powered`", f"--out {tmp_path}`")
    assert f"(commit `{(study / 'PLAN.commit').read_text().strip()}`, before any run)" in committed
    for name in ("curves.png", "differences.png"):
        assert (tmp_path / name).read_bytes() == (study / name).read_bytes(), name
