"""Wiring: for every method YAML in conf/method/ and every (loss, estimator) pair, the per-token loss the
trainer computes (``Method.per_token_loss``, called as train.py calls it) equals an independent NumPy
float64 computation, and each method's behaviour rule at step k carries the budget / temperature / bridge
value that its schedule says (expected values written out here from the YAML's documented formulas, not
taken from ``trb_exp.schedules``).

The inputs are chosen so that a wrong wiring shows: forward and reverse KL differ by > 0.02 nats at every
position, the top-k support (k = 16) is smaller than the vocabulary (V = 24) and changes the value, and
Veto's bridge at b < 1 differs from the teacher."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose
from omegaconf import open_dict

from trb_exp.config import ConfigError
from trb_exp.methods import Method
from trb_exp.rules import SKDSampler, StudentSampler, TeacherSampler, TrustRegionSampler

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
LOSSES = ("reverse_kl", "forward_kl", "ce")
ESTIMATORS = ("full", "topk", "sampled")
V, TOPK = 24, 16


# the methods whose rules this file checks step by step; a baseline added later (one rule module + YAML)
# brings its own tests/test_<name>.py instead of an edit here
COVERED = sorted(["opd", "trb", "fixed_blend", "skd", "veto", "temp_warmup", "sft_warmup", "offline_kd"])


def test_every_shipped_method_is_covered():
    assert set(COVERED) <= set(METHODS)
    for name in METHODS:
        assert name in COVERED or (Path(__file__).parent / f"test_{name}.py").is_file(), name


# ------------------------------------------------------------------------ independent NumPy references
def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(lp, lq):
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_loss(loss, estimator, s, t, y, b=1.0, k=TOPK):
    """Per-token loss [B, T] from student logits s [B, T, V], teacher log-probs t, tokens y, bridge b."""
    ls = np_log_softmax(s)
    q = np_log_softmax(t) if b >= 1 else np_log_softmax(b * np_log_softmax(t) + (1 - b) * ls)
    if loss == "ce":
        return -np.take_along_axis(ls, y[..., None], -1)[..., 0]
    if loss == "forward_kl":
        return np_kl(q, ls)
    if estimator == "full":
        return np_kl(ls, q)
    if estimator == "topk":
        ids = np.argsort(-s, axis=-1, kind="stable")[..., :k]
        return np_kl(np_log_softmax(np.take_along_axis(s, ids, -1)),
                     np_log_softmax(np.take_along_axis(q, ids, -1)))
    lsy = np.take_along_axis(ls, y[..., None], -1)[..., 0]
    lqy = np.take_along_axis(q, y[..., None], -1)[..., 0]
    return (lsy - lqy) * lsy  # the policy-gradient surrogate's value


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(15)
    s = 2.0 * torch.randn(2, 5, V, generator=g, dtype=torch.float64)
    t = torch.log_softmax(2.0 * torch.randn(2, 5, V, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, V, (2, 5), generator=g)
    sn, tn, yn = s.numpy(), t.numpy(), y.numpy()
    # the inputs discriminate: the two directions differ, top-k is not the full sum, the bridge moves
    assert (np.abs(np_loss("reverse_kl", "full", sn, tn, yn) - np_loss("forward_kl", "full", sn, tn, yn)) > 0.02).all()
    assert np.abs(np_loss("reverse_kl", "topk", sn, tn, yn) - np_loss("reverse_kl", "full", sn, tn, yn)).min() > 1e-3
    assert np.abs(np_loss("reverse_kl", "full", sn, tn, yn, b=0.6) - np_loss("reverse_kl", "full", sn, tn, yn)).min() > 1e-2
    assert TOPK < V
    return s, t, y


# ------------------------------------------------------------------------ composed configs
_CFG = {}


def _cfg(name, *extra):
    key = (name, *extra)
    if key not in _CFG:
        _CFG[key] = compose([f"method={name}", *extra])
    return _CFG[key]


def _method_with(name, loss, estimator):
    cfg = _cfg(name).copy()
    with open_dict(cfg.method):
        cfg.method.loss = loss
        cfg.method.estimator = estimator
    return cfg, Method.from_cfg(cfg.method, cfg.schedule)


def _bridge_b(mcfg, step):
    """Veto's documented anneal, from the YAML values: b_start at step 0, linearly to 1 at step K."""
    b0, K = float(mcfg.get("b_start", 1.0)), int(mcfg.get("K", 0))
    return 1.0 if step >= K else b0 + (1.0 - b0) * step / K


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", METHODS)
def test_per_token_loss_matches_numpy(name, loss, estimator, inputs):
    s, t, y = inputs
    base = _cfg(name).method
    invalid = None
    if base.rollout == "teacher" and loss == "reverse_kl" and estimator == "sampled":
        invalid = "the sampled estimator needs student rollouts"
    if float(base.get("b_start", 1.0)) < 1 and loss == "ce":
        invalid = "the bridge target needs a KL loss"
    if invalid:
        with pytest.raises(ConfigError, match=invalid):
            _method_with(name, loss, estimator)
        return
    cfg, m = _method_with(name, loss, estimator)
    assert m.topk == TOPK and (m.objective.name, m.estimator) == (loss, estimator)
    K = int(cfg.method.get("K", 0))
    for step in sorted({0, 1, K // 2, K, K + 3}):
        b = _bridge_b(cfg.method, step)
        want = np_loss(loss, estimator, s.numpy(), t.numpy(), y.numpy(), b=b)
        s_req = s.clone().requires_grad_(True)
        got = m.per_token_loss(s_req, t, y, step)  # the call of train.py
        assert got.shape == y.shape
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-9, atol=1e-9,
                                   err_msg=f"{name} {loss}/{estimator} step {step} (b={b})")
        if loss != "ce":  # and the loss is differentiable in the student logits
            got.sum().backward()
            assert s_req.grad is not None and s_req.grad.abs().sum() > 0


def test_sampled_surrogate_gradient_is_the_reinforce_gradient(inputs):
    """The sampled estimator's gradient: (log pS(y) - log pT(y)) * grad log pS(y), per position."""
    s, t, y = inputs
    _, m = _method_with("opd", "reverse_kl", "sampled")
    s_req = s.clone().requires_grad_(True)
    m.per_token_loss(s_req, t, y, 0).sum().backward()
    ls = np_log_softmax(s.numpy())
    adv = (np.take_along_axis(ls, y.numpy()[..., None], -1) - np.take_along_axis(t.numpy(), y.numpy()[..., None], -1))
    want = adv * (np.eye(V)[y.numpy()] - np.exp(ls))
    np.testing.assert_allclose(s_req.grad.numpy(), want, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------ behaviour rules per step
def _linear(e0, K, k):
    return e0 * (1 - k / K) if k < K else 0.0


SCHEDULE_FORMULAS = {  # conf/schedule/*.yaml, as documented there
    "linear": lambda e0, K, r, k: _linear(e0, K, k),
    "cosine": lambda e0, K, r, k: e0 * (1 + math.cos(math.pi * k / K)) / 2 if k < K else 0.0,
    "exponential": lambda e0, K, r, k: e0 * r ** (k / K) if k < K else 0.0,
    "step": lambda e0, K, r, k: e0 if k < K else 0.0,
    "constant": lambda e0, K, r, k: e0,
    "none": lambda e0, K, r, k: 0.0,
}


def test_every_schedule_yaml_has_a_formula_here():
    from trb_exp.schedules import ADAPTIVE  # gap, reward: functions of the run's history (tests/test_schedules.py)

    assert sorted(SCHEDULE_FORMULAS) == sorted(p.stem for p in (CONF / "schedule").glob("*.yaml") if p.stem not in ADAPTIVE)
    assert set(ADAPTIVE) <= {p.stem for p in (CONF / "schedule").glob("*.yaml")}


@pytest.mark.parametrize("schedule", sorted(SCHEDULE_FORMULAS))
def test_trb_rule_budget_follows_the_schedule(schedule):
    cfg = _cfg("trb", f"schedule={schedule}", "schedule.eps0=0.4", "schedule.warmup_steps=20")
    m = Method.from_cfg(cfg.method, cfg.schedule)
    r = float(cfg.schedule.get("final_ratio", 0.01))
    for k in (0, 1, 5, 10, 19, 20, 21, 100):
        want = SCHEDULE_FORMULAS[schedule](0.4, 20, r, k)
        rule = m.sampler(k, 1.0)
        if want > 0:
            assert isinstance(rule, TrustRegionSampler), (schedule, k)
            assert rule.eps == pytest.approx(want, rel=1e-12) and rule.budget == "absolute"
            assert rule.temperature == 1.0
        else:  # a zero budget is plain student sampling
            assert type(rule) is StudentSampler and rule.temperature == 1.0, (schedule, k)
        assert m.diagnostics(k)["trb/eps"] == pytest.approx(want, rel=1e-12)


def test_trb_default_schedule_values():
    """The default linear schedule at its YAML values (eps0 = 0.5, K = 50)."""
    m = Method.from_cfg(_cfg("trb").method, _cfg("trb").schedule)
    assert [m.sampler(k).eps for k in (0, 10, 25, 49)] == pytest.approx([0.5, 0.4, 0.25, 0.01])
    assert type(m.sampler(50)) is StudentSampler


def test_relative_budget_reaches_the_rule():
    cfg = _cfg("trb", "schedule.budget=relative", "schedule.eps0=0.3", "schedule.warmup_steps=10")
    rule = Method.from_cfg(cfg.method, cfg.schedule).sampler(5, 1.0)
    assert isinstance(rule, TrustRegionSampler) and rule.budget == "relative" and rule.eps == pytest.approx(0.15)


STEPS = (0, 1, 7, 12, 24, 25, 26, 399, 400, 1000)


@pytest.mark.parametrize("name", COVERED)
@pytest.mark.parametrize("base_t", [1.0, 0.7])
def test_rule_at_step_k_has_the_scheduled_value(name, base_t):
    cfg = _cfg(name)
    mc = cfg.method
    m = Method.from_cfg(mc, cfg.schedule)
    for k in STEPS:
        rule = m.sampler(k, base_t)
        if name == "trb":
            eps = _linear(float(cfg.schedule.eps0), int(cfg.schedule.warmup_steps), k)
            if eps > 0:
                assert isinstance(rule, TrustRegionSampler) and rule.eps == pytest.approx(eps, rel=1e-12)
            else:
                assert type(rule) is StudentSampler
            assert rule.temperature == base_t
        elif name == "fixed_blend":
            assert isinstance(rule, TrustRegionSampler) and rule.eps == float(cfg.schedule.eps0) == 0.01
            assert rule.temperature == base_t and m.diagnostics(k)["trb/eps"] == 0.01
        elif name == "skd":
            assert isinstance(rule, SKDSampler)
            assert (rule.top_k, rule.teacher_temperature, rule.temperature) == (15, 0.6, base_t)
        elif name == "temp_warmup":
            t0, K = float(mc.t0), int(mc.K)
            assert (t0, K) == (0.9, 25)
            want = t0 + (base_t - t0) * k / K if k < K else base_t
            assert type(rule) is StudentSampler and rule.temperature == pytest.approx(want, rel=1e-12)
            assert m.diagnostics(k, base_t)["rollout/temperature"] == pytest.approx(want, rel=1e-12)
        elif name == "offline_kd":
            assert type(rule) is TeacherSampler and rule.temperature == base_t
        else:  # opd, veto, sft_warmup: the student at trainer.temperature
            assert type(rule) is StudentSampler and rule.temperature == base_t
        if name == "veto":
            b0, K = float(mc.b_start), int(mc.K)
            assert (b0, K) == (0.6, cfg.trainer.max_steps)
            want = b0 + (1 - b0) * k / K if k < K else 1.0
            assert m.objective.bridge_b(k) == pytest.approx(want, rel=1e-12)
            assert m.diagnostics(k)["veto/b"] == pytest.approx(want, rel=1e-12)
        else:
            assert m.objective.bridge_b(k) == 1.0 and "veto/b" not in m.diagnostics(k)
    if name == "sft_warmup":
        assert (m.sft_samples, m.sft_steps, m.sft_updates) == (4, 50, 25)
    else:
        assert m.sft_updates == 0
