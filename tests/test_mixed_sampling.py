"""method=mixed_sampling (trb_exp/rules/mixture.py): MiniLLM-style teacher-mixed sampling from
alpha * pi_T + (1 - alpha) * pi_S, alpha annealed to 0 over anneal_steps; the loss is OPD's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose

from trb_exp.config import ConfigError
from trb_exp.methods import Method
from trb_exp.decode.backend import sample
from trb_exp.rules import StudentSampler, TeacherSampler
from trb_exp.rules.mixture import MixtureSampler, mixture_logprobs
from trb_exp.trainer import run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.eval_size=2", "trainer.eval_samples=1",
        "trainer.prompts_per_step=2", "trainer.max_new_tokens=8", "threads=1", "trainer.save_student=false"]


def _method(*overrides):
    cfg = compose(["method=mixed_sampling", *overrides])
    return Method.from_cfg(cfg.method, cfg.schedule)


def _np_mixture(s_logits, t_logits, alpha, temperature=1.0):
    """Independent reference: probabilities in float64, mixed, then logged (0 -> -inf)."""
    def softmax(x):
        x = np.asarray(x, dtype=np.float64) / temperature
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return np.log(alpha * softmax(t_logits) + (1 - alpha) * softmax(s_logits))


@pytest.mark.parametrize("alpha, temperature", [(0.2, 1.0), (0.5, 0.7), (0.9, 1.3)])
def test_mixture_matches_a_numpy_reference_with_impossible_tokens(alpha, temperature):
    g = torch.Generator().manual_seed(3)
    s, t = 3 * torch.randn(4, 11, generator=g), 3 * torch.randn(4, 11, generator=g)
    s[0, 2] = float("-inf")                       # only the teacher can emit token 2 in row 0
    t[1, 5] = float("-inf")                       # only the student can emit token 5 in row 1
    s[2, 7] = t[2, 7] = float("-inf")             # nobody emits token 7 in row 2
    logp, diag = MixtureSampler(alpha, temperature=temperature)(s, t)
    want = _np_mixture(s.numpy(), t.numpy(), alpha, temperature)
    assert np.array_equal(np.isneginf(logp.numpy()), np.isneginf(want)) and logp[2, 7] == float("-inf")
    fin = np.isfinite(want)
    np.testing.assert_allclose(logp.numpy()[fin], want[fin], rtol=1e-5, atol=1e-5)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(4)) and not logp.isnan().any()
    assert (diag["kl_behavior_student"] >= 0).all() and diag["kl_behavior_student"].shape == (4,)


def test_alpha_zero_is_the_student_rule_and_alpha_one_the_teacher_rule():
    s, t = torch.randn(3, 9), torch.randn(3, 9)
    assert torch.equal(MixtureSampler(0.0, temperature=0.8)(s, t)[0], StudentSampler(0.8)(s, t)[0])
    assert torch.equal(MixtureSampler(1.0, temperature=0.8)(s, t)[0], TeacherSampler(0.8)(s, t)[0])
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    assert torch.equal(mixture_logprobs(ls, lt, 0.0), ls) and torch.equal(mixture_logprobs(ls, lt, 1.0), lt)
    # through the method: alpha = 0 samples from the student alone (no teacher in the decode loop)
    assert type(_method("method.alpha=0").sampler(0, 0.7)) is StudentSampler


def test_defaults_and_the_anneal_schedule():
    m = _method()
    assert (m.behaviour.alpha, m.behaviour.anneal_steps, m.objective.name, m.estimator) == (0.2, 0, "reverse_kl", "topk")
    assert all(m.sampler(k).alpha == 0.2 for k in (0, 10, 399))  # constant by default (MiniLLM)
    m = _method("method.alpha=0.4", "method.anneal_steps=10")
    for k, want in ((0, 0.4), (1, 0.36), (5, 0.2), (9, 0.04)):
        rule = m.sampler(k, 0.9)
        assert isinstance(rule, MixtureSampler) and rule.alpha == pytest.approx(want, rel=1e-12) and rule.temperature == 0.9
        assert m.diagnostics(k)["mixed/alpha"] == pytest.approx(want, rel=1e-12)
    assert all(type(m.sampler(k)) is StudentSampler and m.diagnostics(k)["mixed/alpha"] == 0.0 for k in (10, 11, 500))


@pytest.mark.parametrize("override, message", [
    ("method.alpha=1.5", "method.alpha=1.5: the teacher's share of the mixture must be in [0, 1]"),
    ("method.alpha=-0.1", "method.alpha=-0.1: the teacher's share of the mixture must be in [0, 1]"),
    ("method.alpha=nan", "method.alpha=nan: must be a finite number"),
    ("method.anneal_steps=-3", "method.anneal_steps=-3: the anneal horizon must be >= 0"),
    ("method.anneal_steps=2.5", "method.anneal_steps=2.5: must be an integer"),
])
def test_bad_knobs_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        _method(override)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.slow
def test_bad_alpha_exits_2_with_one_line_before_any_model_loads(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trb_exp.train", "method=mixed_sampling", "method.alpha=1.5",
                          "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["error: method.alpha=1.5: the teacher's share of the mixture must be in [0, 1] (MiniLLM: 0.2)"]


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_mixture_rollouts_on_both_engines(engine, tiny_pair):
    from trb_exp.data import encode_prompts
    from trb_exp.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_pair / "student"))
    student, teacher = (load_model(str(tiny_pair / n), device=torch.device("cpu"), train=False)
                        for n in ("student", "teacher"))
    ids, mask = encode_prompts(tok, ["1+2=", "3+4=", "12+5="])
    kw = dict(max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, engine=engine)
    ro = sample(student, teacher, ids, mask, MixtureSampler(0.3), generator=torch.Generator().manual_seed(0), **kw)
    m = ro.response_mask
    assert ro.teacher_logprobs is not None and m.any()
    kl = ro.diagnostics["kl_behavior_student"][m]
    assert (kl >= 0).all() and kl.max() > 0  # the teacher moved the behaviour away from the student
    same = sample(student, teacher, ids, mask, MixtureSampler(0.3), generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(ro.input_ids, same.input_ids)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["eager", "static"])
def test_two_step_run_end_to_end(engine, tiny_pair, tmp_path):
    cfg = compose(["method=mixed_sampling", "method.anneal_steps=2", f"rollout.engine={engine}", *FAST,
                   f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}"])
    summary = run(cfg, tmp_path)
    assert summary["method"] == "mixed_sampling" and summary["final"]["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["train/loss"]) for r in train)
    assert [r["mixed/alpha"] for r in train] == pytest.approx([0.2, 0.1])
    assert all(r["mixed/kl_behavior_student_mean"] >= 0 for r in train) and "trb/eps" not in train[0]
