"""End-to-end: each method through Hydra's compose API on a tiny random pair, and the CLI's
one-line errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from budget import assert_budget_used, record_rollouts
from conftest import compose
from transformers import AutoModelForCausalLM

import trb_exp.trainer as train_mod
from trb_exp.config import ConfigError
from trb_exp.trainer import run

FAST = ["logger=none", "trainer.max_steps=3", "trainer.eval_every=2", "trainer.eval_size=8",
        "trainer.eval_samples=2", "trainer.prompts_per_step=4", "trainer.max_new_tokens=12", "threads=1"]


def _pair(tiny_pair):
    return [f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}"]


def test_one_training_step_of_the_embedded_pair(tmp_path, monkeypatch):
    """The fast tier's end-to-end check: one TRB step of the shipped pair, in-process, at tiny sizes."""
    import torch

    from trb_exp.models import EMBEDDED

    cfg = compose(["method=trb", "logger=none", "trainer.max_steps=1", "trainer.eval_every=0", "trainer.eval_size=4",
                   "trainer.eval_samples=1", "trainer.prompts_per_step=2", "trainer.max_new_tokens=8", "threads=1",
                   "schedule.eps0=0.5", "trainer.progress=false"])
    rollouts = record_rollouts(monkeypatch, train_mod)
    summary = run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in rows if "train/loss" in r]
    assert step["step"] == 1 and step["train/loss"] >= 0 and step["trb/eps"] == 0.5  # eps_0 = eps0 (1 - 0/K)
    assert step["trb/kl_behavior_student_max"] <= 0.5 + 1e-6 and len(rollouts) == 1
    assert_budget_used(rollouts[0], eps=0.5)  # per token: KL <= eps, and = eps wherever beta < 1
    assert rollouts[0].response_ids.shape[0] == 4 and rollouts[0].response_ids.shape[1] <= 8  # 2 prompts x 2 rollouts
    assert [r["step"] for r in rows if "eval/pass@1" in r] == [0, 1] and summary["final"]["step"] == 1
    before = AutoModelForCausalLM.from_pretrained(EMBEDDED / "student").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "student").state_dict()
    assert before.keys() == after.keys() and all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step moved the weights


@pytest.mark.slow
@pytest.mark.parametrize("method", ["opd", "trb", "offline_kd"])
def test_each_method_runs_end_to_end(method, tiny_pair, tmp_path, monkeypatch):
    # trb: eps0 = 0.01 binds on the tiny random pair (its KL(pi_T||pi_S) is 0.006-0.017 nats per token)
    cfg = compose([f"method={method}", *FAST, *_pair(tiny_pair), *(["schedule.eps0=0.01"] if method == "trb" else [])])
    rollouts = record_rollouts(monkeypatch, train_mod)
    summary = run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval/pass@1" in r] == [0, 2, 3]
    assert all(r["train/loss"] >= 0 for r in train_rows)
    if method == "trb":  # budget logged and respected: linear schedule from eps0 over K steps
        eps0, K = cfg.schedule.eps0, cfg.schedule.warmup_steps
        assert [r["trb/eps"] for r in train_rows] == pytest.approx([eps0 * (1 - k / K) for k in range(3)])
        assert all(r["trb/kl_behavior_student_max"] <= r["trb/eps"] + 1e-6 for r in train_rows)
        assert len(rollouts) == 3  # per token: KL <= eps_k, and KL >= eps_k (1 - 1e-3) wherever beta < 1
        assert all(assert_budget_used(ro, eps=eps0 * (1 - k / K)) > 0 for k, ro in enumerate(rollouts))
    if method == "offline_kd":  # the student never samples: no student log-probs in the rollout
        assert "rollout/student_logprob" not in train_rows[0]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").exists() and student.config.model_type == "llama"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["method"] == method and saved["final"]["step"] == 3 == summary["final"]["step"]
    env = saved["env"]  # the run's environment record (trb_exp.run.environment)
    assert env["threads"] == 1 and env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.slow
def test_training_is_deterministic(tiny_pair, tmp_path):
    cfg = compose(["method=trb", *FAST, *_pair(tiny_pair), "trainer.eval_every=0"])
    a = run(cfg, tmp_path / "a")
    b = run(cfg, tmp_path / "b")
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if "time" not in k and not k.endswith("_s")
                           and k != "trb/solver_share"} for r in rows]
    assert strip(la) == strip(lb) and a["final"] == b["final"]


@pytest.mark.slow  # two short runs
def test_validation_split_is_scored_and_changes_nothing_else(tiny_pair, tmp_path):
    import hashlib

    from trb_exp.data import load_task
    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.evaluation import evaluate

    base = ["method=trb", "schedule.eps0=0.01", *FAST, *_pair(tiny_pair)]
    run(compose([*base, "dataset.val_size=0"]), tmp_path / "none")
    cfg = compose([*base, "dataset.val_size=6"])
    run(cfg, tmp_path / "val")
    rows = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("none", "val")}
    keep = lambda r: {k: v for k, v in r.items() if not k.startswith("val/") and "time" not in k
                      and not k.endswith("_s") and k != "trb/solver_share"}
    assert [keep(r) for r in rows["val"]] == [keep(r) for r in rows["none"]]  # every other value, bit for bit
    assert not any(k.startswith("val/") for r in rows["none"] for k in r)
    sha = {d: hashlib.sha256((tmp_path / d / "student" / "model.safetensors").read_bytes()).hexdigest() for d in rows}
    assert sha["val"] == sha["none"]
    logged = [r for r in rows["val"] if "val/pass@1" in r]
    assert [r["step"] for r in logged] == [0, 2, 3]
    # the logged score is evaluate() of the final student on the 6 validation problems, seed + 2
    task = load_task(cfg.dataset)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "val" / "student")
    ref = evaluate(student, build_char_tokenizer(), task.val_prompts, task.val_answers, task.grade, n_samples=2,
                   max_new_tokens=12, seed=cfg.seed + 2, eos_ids=(student.config.eos_token_id,))
    assert logged[-1]["val/pass@1"] == ref["pass@1"] and logged[-1]["val/mean_length"] == ref["mean_length"]


@pytest.mark.parametrize("override, message", [
    ("schedule.eps0=-0.1", "schedule.eps0=-0.1: a KL budget must be >= 0"),
    ("schedule.warmup_steps=0", "schedule.warmup_steps=0"),
    ("method.loss=l2", "method.loss='l2': choose one of"),
    ("trainer.max_new_tokens=0", "trainer.max_new_tokens=0"),
    ("schedule.name=warp", "schedule.name='warp': choose one of"),
    ("schedule.budget=relative,schedule.eps0=1.5", "schedule.eps0=1.5: a relative budget"),
])
def test_config_errors_name_the_field(override, message, tiny_pair, tmp_path):
    cfg = compose([*FAST, *_pair(tiny_pair), *override.split(",")])  # the override wins
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        run(cfg, tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_tokenizer_mismatch_is_caught(tiny_pair, tmp_path):
    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.models import tiny_llama

    tok = build_char_tokenizer(chars="0123456789+-*=;A:xyz")
    m = tiny_llama(tok, hidden=16, layers=1, heads=2, intermediate=32)
    m.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    cfg = compose([*FAST, f"model.student={tiny_pair / 'student'}", f"model.teacher={tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match="student and teacher tokenizers differ"):
        run(cfg, tmp_path / "run")


@pytest.mark.slow
def test_local_dataset_errors(tiny_pair, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+2=", "answer": "3"}\n')
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"question": "1+2=", "answer": "3"}\n')
    base = ["dataset=local", *FAST, *_pair(tiny_pair)]
    for train, msg in [(empty, "no rows"), (nofield, "no column 'prompt'"), (tmp_path / "missing.jsonl", "no such file")]:
        cfg = compose([*base, f"dataset.train_file={train}", f"dataset.test_file={good}"])
        with pytest.raises(ConfigError, match=msg):
            run(cfg, tmp_path / "run")
    cfg = compose([*base, f"dataset.train_file={good}", f"dataset.test_file={good}"])
    assert run(cfg, tmp_path / "ok")["final"]["step"] == 3


def _cli(*args):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "trb_exp.train", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.slow
def test_cli_prints_one_line_errors(tmp_path):
    r = _cli("schedule.eps0=-1", "logger=none", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: schedule.eps0=-1.0: a KL budget must be >= 0 (0 = plain OPD)"
    assert "Traceback" not in r.stderr
    r = _cli("method=nonsense", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0 and "Could not find 'method/nonsense'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_help_and_cfg():
    r = _cli("--cfg", "job")
    assert r.returncode == 0 and "warmup_steps" in r.stdout and "max_steps" in r.stdout
    r = _cli("--help")
    methods = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "method").glob("*.yaml"))
    assert {"fixed_blend", "offline_kd", "opd", "sft_warmup", "skd", "temp_warmup", "trb", "veto"} <= set(methods)
    assert r.returncode == 0 and "method: " + ", ".join(methods) in r.stdout


@pytest.mark.slow
def test_eval_every_zero_still_evaluates_at_start_and_end(tiny_pair, tmp_path):
    cfg = compose([*FAST, *_pair(tiny_pair), "trainer.eval_every=0", "trainer.max_steps=2"])
    summary = run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/pass@1" in r] == [0, 2] and summary["final"]["step"] == 2
