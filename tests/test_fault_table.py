"""Faults a new user meets (issue 22), one row each: the exact line, the exit code (through the CLI for the
rows marked slow), and that no stray directory or other run's file is left. The rows of issue 10 are in
``test_bad_input_table.py``; verified checkpoints are tested file by file in ``test_checkpoint_verify.py``."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose

from trb_exp import experiment
from trb_exp.config import ConfigError
from trb_exp.trainer import run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.max_steps=1", "trainer.eval_size=4", "trainer.eval_samples=1",
        "trainer.prompts_per_step=2", "trainer.max_new_tokens=4", "threads=1", "device=cpu", "trainer.progress=false"]


def _pair(tiny_pair):
    return [f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}"]


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(experiment, "load_model", fail)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault_data")
    (d / "good.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": "4"}\n')
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "1+2=", "answer": "3"}\n{"prompt": "caf\xe9 2+2=", "answer": "4"}\n')
    (d / "three.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n\n{"prompt": "2+2=", "answer": "three"}\n')
    (d / "nan.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": NaN}\n')
    (d / "nan_text.jsonl").write_text('{"prompt": "1+2=", "answer": "nan"}\n')
    return d


def _local(d, train, *more):
    return ["dataset=local", f"dataset.train_file={d / train}", f"dataset.test_file={d / 'good.jsonl'}", *more]


# (file, extra overrides, the exact message); {f} is the file's path
DATA_ROWS = [
    ("latin1.jsonl", (), "dataset.train_file='{f}': line 2 is not UTF-8 text (byte 0xe9 at column 16); save the file "
                         "as UTF-8"),
    ("three.jsonl", (), "dataset.train_file='{f}': line 3: answer 'three' can never be graded; the exact grader "
                        "compares integers: give an integer answer, or dataset.grader=math"),
    ("nan.jsonl", (), "dataset.train_file='{f}': line 2 has an empty or non-text 'prompt'/'answer'"),
    ("nan_text.jsonl", ("dataset.grader=math",),
     "dataset.train_file='{f}': line 1: answer 'nan' can never be graded; math-verify cannot parse it as a number "
     "or expression: give the final answer (e.g. 42 or \\frac{{1}}{{2}})"),
]


@pytest.mark.parametrize("name, extra, message", DATA_ROWS, ids=[r[0] for r in DATA_ROWS])
def test_data_row_is_one_line_naming_file_and_line(name, extra, message, data, tiny_pair, tmp_path, no_model_load):
    with pytest.raises(ConfigError) as e:
        run(compose([*FAST, *_pair(tiny_pair), *_local(data, name, *extra)]), tmp_path / "run")
    assert str(e.value) == message.format(f=data / name)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- through the CLI
def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "trb_exp.train", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=cwd)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.slow
def test_cli_data_row_exit_2_and_no_directory(data, tiny_pair, tmp_path):
    name, extra, message = DATA_ROWS[0]
    r = _cli(*FAST, *_pair(tiny_pair), *_local(data, name, *extra), f"hydra.run.dir={tmp_path / 'runs' / 'x'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: " + message.format(f=data / name)
    assert "Traceback" not in r.stderr + r.stdout and not (tmp_path / "runs").exists()
