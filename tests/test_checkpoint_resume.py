"""Checkpoint, resume and preemption (issue 10): a run killed with ``kill -9`` after its step-6
checkpoint and resumed with the same command, or stopped by SIGTERM and resumed, gives the same
``metrics.jsonl`` (every value but wall times) and the same final student as the uninterrupted run;
SIGINT checkpoints and prints one line with the resume command."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose, wait_until
from safetensors.torch import load_file

from trb_exp.run.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED, Stopped, StopSignals
from trb_exp.run.state import list_checkpoints
from trb_exp.trainer import run

pytestmark = pytest.mark.slow  # end-to-end runs in subprocesses, killed and resumed

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["logger=none", "method=trb", "trainer.max_steps=12", "trainer.eval_every=4", "trainer.eval_size=8",
        "trainer.eval_samples=2", "trainer.prompts_per_step=4", "trainer.max_new_tokens=12", "threads=1",
        "trainer.checkpoint_every=6", "trainer.keep_checkpoints=0", "trainer.progress=false"]


def _pair(tiny_pair):
    return [f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}"]


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock values (time/*, decode seconds, the solver's share of them)."""
    return [{k: v for k, v in json.loads(line).items()
             if not k.startswith("time/") and k not in ("rollout/decode_s", "trb/solver_share")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path) -> dict:
    return load_file(run_dir / "student" / "model.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _start(run_dir: Path, *extra):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "trb_exp.train", *extra, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_steps(run_dir: Path) -> int:
    p = run_dir / "metrics.jsonl"
    return sum('"train/loss"' in line for line in p.read_text().splitlines()) if p.exists() else 0


@pytest.fixture(scope="module")
def reference(tiny_pair, tmp_path_factory):
    """The uninterrupted 12-step run (in process: the same code path as the CLI's)."""
    d = tmp_path_factory.mktemp("reference")
    run(compose([*ARGS, *_pair(tiny_pair)]), d)
    assert [p.name for p in list_checkpoints(d / "checkpoints")] == ["step_6", "step_12"]
    return d


def test_kill_9_after_step_6_checkpoint_resumes_identically(reference, tiny_pair, tmp_path):
    args = [*ARGS, *_pair(tiny_pair)]
    proc = _start(tmp_path, *args)
    wait_until(proc, lambda: (tmp_path / "checkpoints" / "step_6" / "state.pt").exists(), timeout=120.0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "summary.json").exists()
    r = _start(tmp_path, *args)  # the same command: trainer.resume=auto continues from step 6
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    assert "[resume]" in out and "step 6 of 12" in out
    assert _rows(tmp_path) == _rows(reference)  # every training and evaluation value, each step once
    assert _same_weights(tmp_path, reference)
    assert json.loads((tmp_path / "summary.json").read_text())["final"] == \
        json.loads((reference / "summary.json").read_text())["final"]


def test_sigterm_checkpoints_exits_75_and_resumes_identically(reference, tiny_pair, tmp_path):
    args = [*ARGS, *_pair(tiny_pair), "trainer.checkpoint_every=0"]  # only the signal writes a checkpoint
    proc = _start(tmp_path, *args)
    wait_until(proc, lambda: _train_steps(tmp_path) >= 2, timeout=120.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED == 75, err
    assert "Traceback" not in err
    (ckpt,) = list_checkpoints(tmp_path / "checkpoints")
    k = int(ckpt.name.split("_")[1])
    assert 2 <= k < 12 and f"checkpoint {ckpt}" in err.strip().splitlines()[-1]
    run(compose(args), tmp_path)  # resume (in process: the kill -9 test resumes through the CLI)
    assert _rows(tmp_path) == _rows(reference) and _same_weights(tmp_path, reference)


def test_sigint_checkpoints_and_prints_the_resume_command(tiny_pair, tmp_path):
    args = [*ARGS, *_pair(tiny_pair), "trainer.checkpoint_every=0"]
    proc = _start(tmp_path, *args)
    wait_until(proc, lambda: _train_steps(tmp_path) >= 1, timeout=120.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED == 130, err
    assert "Traceback" not in err
    (ckpt,) = list_checkpoints(tmp_path / "checkpoints")
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"[interrupted] checkpoint {ckpt}; resume with: python -m trb_exp.train ")
    assert line.endswith(f"hydra.run.dir={tmp_path}") and "trainer.max_steps=12" in line


def test_sigusr1_in_process_checkpoints_the_current_step(tiny_pair, tmp_path):
    """A signal that arrives before step 0 (during setup or the initial evaluation) still checkpoints."""
    cfg = compose([*ARGS, *_pair(tiny_pair), "trainer.max_steps=2"])
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested == "SIGUSR1"
        with pytest.raises(Stopped) as e:
            run(cfg, tmp_path, stop)
    assert e.value.exit_code == EXIT_PREEMPTED and e.value.checkpoint == tmp_path / "checkpoints" / "step_0"
    assert (e.value.checkpoint / "state.pt").is_file() and not (tmp_path / "summary.json").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers are restored


def test_resume_refuses_another_config_and_keeps_checkpoints_bounded(tiny_pair, tmp_path):
    from trb_exp.config import ConfigError

    base = [*ARGS, *_pair(tiny_pair), "trainer.max_steps=4", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2",
            "trainer.eval_every=0"]
    run(compose([*base, "trainer.max_steps=3"]), tmp_path)  # stops at 3: checkpoints 2 and 3 stay
    (tmp_path / "summary.json").unlink()  # as if it had been preempted after step 3
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_2", "step_3"]
    with pytest.raises(ConfigError, match=r"another config \(optim.lr differ\)"):
        run(compose([*base, "optim.lr=0.5"]), tmp_path)
    with pytest.raises(ConfigError, match="trainer.resume=never: run dir .* already holds a run"):
        run(compose([*base, "trainer.resume=never"]), tmp_path)
    summary = run(compose(base), tmp_path)  # max_steps may grow on resume
    assert summary["final"]["step"] == 4
    assert [r["step"] for r in _rows(tmp_path) if "train/loss" in r] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_3", "step_4"]
    with pytest.raises(ConfigError, match="holds a finished run"):
        run(compose(base), tmp_path)


class _StopAfter:
    """A stop request (as SIGTERM would make) once ``n`` training steps are logged in ``run_dir``."""

    def __init__(self, run_dir: Path, n: int):
        self.run_dir, self.n = run_dir, n

    @property
    def requested(self):
        return "SIGTERM" if _train_steps(self.run_dir) >= self.n else None


@pytest.mark.parametrize("schedule", ["gap", "reward"])
def test_adaptive_budget_resumes_from_its_checkpointed_state(schedule, tiny_pair, tmp_path):
    """An adaptive budget's state (schedule=gap|reward) travels in the checkpoint: stopped after step 6 and
    resumed, the run gives the budgets, metrics and weights of the uninterrupted 12 steps."""
    args = [*ARGS, *_pair(tiny_pair), f"schedule={schedule}", "schedule.eps0=0.5", "trainer.checkpoint_every=0"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(compose(args), full)
    with pytest.raises(Stopped):
        run(compose(args), part, stop=_StopAfter(part, 6))
    assert [c.name for c in list_checkpoints(part / "checkpoints")] == ["step_6"]
    run(compose(args), part)
    eps = [r["trb/eps"] for r in _rows(full) if "trb/eps" in r]
    assert len(eps) == 12 and eps[0] == 0.5 and len(set(eps)) > 1  # the budget moved with the observations
    assert _rows(part) == _rows(full) and _same_weights(part, full)


class Counter:
    """A stand-in for a stateful budget controller: any object with state_dict()/load_state_dict()."""

    def __init__(self, n=0):
        self.n, self.loaded = n, None

    def state_dict(self):
        return {"n": self.n, "t": torch.arange(3) * self.n}

    def load_state_dict(self, state):
        self.loaded = state
        self.n = state["n"]


def test_extras_and_resume_from_another_runs_checkpoint(tiny_pair, tmp_path, monkeypatch):
    import trb_exp.trainer as train_mod

    made = []

    def setup_with_counter(cfg, *built):
        exp = real_setup(cfg, *built)
        exp.stateful["budget"] = Counter(n=7 if not made else 0)  # the first run's counter has moved
        made.append(exp.stateful["budget"])
        return exp

    real_setup = train_mod.setup
    monkeypatch.setattr(train_mod, "setup", setup_with_counter)
    base = [*ARGS, *_pair(tiny_pair), "trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.eval_every=0"]
    run(compose(base), tmp_path / "a")
    state = torch.load(tmp_path / "a" / "checkpoints" / "step_1" / "state.pt", weights_only=True)
    assert state["extras"]["budget"]["n"] == 7 and state["step"] == 1
    # resume=PATH: a fork of run a from its step-1 checkpoint, in a new run dir
    run(compose([*base, f"trainer.resume={tmp_path / 'a' / 'checkpoints' / 'step_1'}"]), tmp_path / "b")
    assert made[1].n == 7 and torch.equal(made[1].loaded["t"], torch.arange(3) * 7)
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")  # seeded with a's rows up to step 1, then the same step 2
    assert _same_weights(tmp_path / "a", tmp_path / "b")
