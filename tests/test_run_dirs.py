"""Run directories (issue 10): two runs started in the same second never share a directory, a run never
changes another run's files (not even one rejected at validation), a finished run's directory is
refused in one line, and metrics.jsonl is strict JSON."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose

from trb_exp.config import ConfigError
from trb_exp.logger import RunLogger
from trb_exp.run.rundir import RunDir
from trb_exp.trainer import run

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _cmd(tiny_pair, *extra):
    return [sys.executable, "-m", "trb_exp.train", "logger=none", "trainer.max_steps=1", "trainer.eval_size=2",
            "trainer.eval_samples=1", "trainer.prompts_per_step=2", "trainer.max_new_tokens=4", "threads=1",
            "trainer.progress=false", f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}",
            *extra]


@pytest.mark.slow
def test_same_second_runs_get_their_own_dirs_and_finished_runs_are_left_alone(tiny_pair, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(_cmd(tiny_pair), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    dirs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(dirs) == 2
    for d in dirs:  # each holds exactly one run's record
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "train/loss" in r] == [1]
        assert (d / "summary.json").is_file() and (d / ".hydra" / "config.yaml").is_file()

    finished = dirs[0]
    before = _snapshot(finished)
    # a run pointed at it, and one that is also rejected at validation (Hydra used to rewrite .hydra/ first)
    r = subprocess.run(_cmd(tiny_pair, "optim.lr=abc", f"hydra.run.dir={finished}"), cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: optim.lr='abc': must be a finite number > 0")
    with pytest.raises(ConfigError, match=f"run dir {finished} holds a finished run"):
        run(compose(_cmd(tiny_pair)[3:]), finished)
    assert _snapshot(finished) == before  # not one byte of the finished run changed, .hydra/ included
    assert sorted((tmp_path / "outputs" / "runs").iterdir()) == dirs  # and no new directory


def test_a_dir_in_use_is_refused(tmp_path):
    with RunDir(tmp_path / "r"):
        with pytest.raises(ConfigError, match="is in use by another run"):
            with RunDir(tmp_path / "r"):
                pass
    with RunDir(tmp_path / "r"):  # free again once the first one is done
        pass


def test_rejected_new_dir_is_removed(tmp_path):
    with RunDir(tmp_path / "new") as rd:
        rd.reject()
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("x")
    with RunDir(tmp_path / "old") as rd:
        rd.reject()
    assert (tmp_path / "old" / "keep.txt").read_text() == "x"


def test_metrics_jsonl_is_strict_json(tmp_path, capsys):
    log = RunLogger(tmp_path, backend="none")
    log.log({"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5, "e": 2}, 1)
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) == \
        {"step": 1, "a": None, "b": None, "c": None, "d": 1.5, "e": 2}
    assert "[warning] a=nan is not a finite number" in capsys.readouterr().err


def test_resume_cuts_metrics_back_and_drops_a_torn_line(tmp_path):
    rows = [{"step": 0, "eval/pass@1": 0.1}, {"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.9},
            {"step": 3, "train/loss": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "tr')
    RunLogger(tmp_path, backend="none", resume_step=2).close()
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:3]


@pytest.mark.slow
def test_a_resubmitted_sweep_skips_its_finished_jobs(tiny_pair, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    job = tmp_path / "sweep" / "job"
    run(compose(_cmd(tiny_pair)[3:]), job)  # the job the first submission finished (in process: cheaper)
    before = _snapshot(job)
    sweep = _cmd(tiny_pair, "seed=0", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=job")
    sweep.insert(3, "-m")  # python -m trb_exp.train -m ...
    again = subprocess.run(sweep, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"[skip] {job} holds a finished run" in again.stderr, again.stderr
    after = _snapshot(job)
    assert after.pop("train.log", None) in (None, hashlib.sha256(b"").hexdigest())  # Hydra's (empty) job log
    assert after == before
