"""Bad input (issue 10): every row is one line naming the field, raised before any model is loaded
(``load_model`` is patched to fail the test if it is reached); a few rows also through the CLI
(exit code 2, one ``error:`` line, no traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose

from trb_exp import compare, experiment
from trb_exp.config import ConfigError
from trb_exp.trainer import run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.max_steps=1", "trainer.eval_size=4", "trainer.eval_samples=1",
        "trainer.prompts_per_step=2", "trainer.max_new_tokens=4", "threads=1", "device=cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_pair):
    d = tmp_path_factory.mktemp("bad_data")
    (d / "good.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": "4"}\n')
    (d / "torn.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answ\n')
    (d / "long.jsonl").write_text(json.dumps({"prompt": "1+" * 100 + "1=", "answer": "101"}) + "\n")
    (d / "accents.jsonl").write_text('{"prompt": "héllo 1+2=", "answer": "3"}\n')
    (d / "empty_model").mkdir()
    return d


def _pair(tiny_pair):
    return [f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}"]


def _local(d, train):
    return ["dataset=local", f"dataset.train_file={d / train}", f"dataset.test_file={d / 'good.jsonl'}"]


# (overrides, the start of the message); {d} is the data directory, {pair} the tiny pair
TRAIN_ROWS = [
    ("schedule.eps0=abc", "schedule.eps0='abc': must be a finite number"),
    ("method.topk=abc", "method.topk='abc': must be an integer"),
    ("optim.grad_clip=abc", "optim.grad_clip='abc': must be a finite number > 0"),
    ("schedule.warmup_steps=abc", "schedule.warmup_steps='abc': must be an integer"),
    ("schedule.eps0=inf", "schedule.eps0=inf: must be a finite number"),
    ("trainer.temperature=inf", "trainer.temperature=inf: sampling temperature must be a finite number > 0"),
    ("optim.lr=inf", "optim.lr=inf: must be a finite number > 0"),
    ("schedule=exponential schedule.final_ratio=-1", "schedule.final_ratio=-1.0: the decay ratio"),
    ("threads=-1", "threads=-1: must be an integer >= 0"),
    ("dataset=local", "dataset.train_file is not set: give a JSONL file with prompt and answer fields, e.g."),
    ("model=hf", "model.student is not set: give a hub id or a local directory, e.g. model.student="),
    ("device=cuda:4096", "device='cuda:4096': this machine has"),  # no machine has that many GPUs
    ("model.dtype=float16", "model.dtype='float16': float16 training does not work on the CPU"),
    ("LOCAL:torn.jsonl", "line 2 is not valid JSON"),
    ("LOCAL:long.jsonl", "prompt 0 is 203 tokens, no room for a response in the student's 128 positions"),
    ("LOCAL:accents.jsonl", "prompt 0 has text the student's tokenizer cannot encode"),
    ("model.student={d}/empty_model", "model.student='{d}/empty_model': the directory is empty; give a directory "
                                      "written by save_pretrained"),
]


@pytest.mark.parametrize("overrides, message", TRAIN_ROWS, ids=[r[0].split("=")[0] for r in TRAIN_ROWS])
def test_train_bad_input_is_one_line_before_any_model_loads(overrides, message, data, tiny_pair, tmp_path,
                                                            no_model_load):
    ov = _local(data, overrides.split(":", 1)[1]) if overrides.startswith("LOCAL:") else \
        overrides.format(d=data).split()
    base = [] if overrides == "model=hf" else _pair(tiny_pair)
    cfg = compose([*FAST, *base, *ov])
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith(message.format(d=data)) or message.format(d=data) in msg, msg
    assert "\n" not in msg
    assert not (tmp_path / "run").exists()  # nothing written


def test_device_cuda_without_a_gpu(tiny_pair, tmp_path, no_model_load, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine, wherever it runs
    with pytest.raises(ConfigError, match=r"^device='cuda': this machine has 0 CUDA GPU\(s\) visible; use device=auto"):
        run(compose([*FAST, *_pair(tiny_pair), "device=cuda"]), tmp_path)


def _eval_cfg(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("evaluate", overrides=list(overrides))


@pytest.mark.parametrize("overrides, message", [
    ((), "model.student is not set: give a hub id or a local directory"),
    (("dataset=arithmetic", "eval.ks=[1,8]", "eval.samples=4"), "eval.ks=[1, 8]: pass@8 needs at least that many"),
    (("dataset=arithmetic", "eval.samples=0"), "eval.samples=0: must be null (each benchmark's own n) or an integer >= 1"),
])
def test_evaluate_bad_input(overrides, message, tiny_pair, tmp_path, no_model_load):
    from trb_exp.evaluate import run as evaluate_run

    student = [] if not overrides else [f"model.student={tiny_pair / 'student'}"]
    with pytest.raises(ConfigError) as e:
        evaluate_run(_eval_cfg(*student, *overrides, "threads=1"), tmp_path / "out")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_evaluate_embedded_checkpoint_on_arithmetic_uses_the_task_format(tiny_pair, tmp_path):
    cfg = _eval_cfg(f"model.student={tiny_pair / 'student'}", "dataset=arithmetic", "eval.size=2",
                    "eval.max_new_tokens=40", "threads=1")
    exp = experiment.setup_eval(cfg)  # model=hf's "Question: ...\nAnswer:" would score 0.000
    from trb_exp.data import load_task

    raw = load_task(cfg.dataset).test_prompts[:2]
    assert exp.benchmarks[0].prompts == raw


def _write_run(d: Path, summary: str = '{"final": {}}', metrics: str = '{"step": 0, "eval/pass@1": 0.5}\n'):
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text("seed: 0\nmethod: {name: opd}\n")
    (d / "metrics.jsonl").write_text(metrics)
    (d / "summary.json").write_text(summary)


@pytest.mark.parametrize("case, message", [
    ("summary", "summary.json: not valid JSON"),
    ("metrics", "metrics.jsonl: line 2 is not valid JSON"),
    ("paper", "error: --paper {d}/nope.json: no such file"),
    ("out", "error: --out {d}/afile: a file is there"),
])
def test_compare_bad_input_names_the_file(case, message, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "r"
    _write_run(run_dir, summary="{oops" if case == "summary" else '{"final": {}}',
               metrics='{"step": 0, "eval/pass@1": 0.5}\n{"step": 1, "eval/pa' if case == "metrics" else
               '{"step": 0, "eval/pass@1": 0.5}\n')
    (tmp_path / "afile").write_text("x")
    args = [str(tmp_path / "runs")]
    args += {"paper": ["--paper", str(tmp_path / "nope.json")], "out": ["--out", str(tmp_path / "afile")]}.get(case, [])
    with pytest.raises(SystemExit) as e:
        compare.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message.format(d=tmp_path) in err[-1]


def test_prepare_out_is_a_file(tmp_path, capsys):
    from trb_exp import prepare

    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        prepare.main(["--out", str(tmp_path / "f")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'f'}: a file is there")


def test_hub_id_without_network_fails_fast(monkeypatch):
    import time

    from trb_exp.preflight import check_available

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    with pytest.raises(ConfigError, match="cannot be reached from here"):
        check_available("nobody/not-a-model-xyz", "model.student")
    assert time.time() - t0 < 10


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trb_exp.train", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


@pytest.mark.slow
def test_cli_row_is_one_line_exit_2_and_leaves_nothing(tmp_path):
    """One row end to end (tests/test_train.py has another): a required value left unset."""
    for args, line in [(["model=hf"], "error: model.student is not set: give a hub id or a local directory, "
                                      "e.g. model.student=Qwen/Qwen3-0.6B-Base")]:
        r = _cli(*args, "logger=none", f"hydra.run.dir={tmp_path / 'runs' / 'x'}")
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [line], r.stderr
        assert "Traceback" not in r.stderr + r.stdout
        assert not (tmp_path / "runs").exists()  # the rejected run left no directory
