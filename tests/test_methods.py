"""Each method's mechanism: SKD's replacements, temp_warmup's temperature, Veto's bridge target and
its b schedule, sft_warmup's prompts, offline KD's never-sampling student, fixed_blend's constant
budget, the sampled estimator's KL estimate; and every method end to end through Hydra."""

import json
import random
import re

import pytest
import torch
from budget import assert_budget_used, record_rollouts
from conftest import compose

import trb_exp.decode.teacher_pass as teacher_pass_mod
import trb_exp.trainer as train_mod
import trb_exp.warm_start as warm_mod
from trb_exp import losses
from trb_exp.config import ConfigError
from trb_exp.data import encode_prompts
from trb_exp.methods import Method
from trb_exp.models import load_model, load_tokenizer
from trb_exp.decode.backend import sample
from trb_exp.rules import SKDSampler, StudentSampler, TeacherSampler, TrustRegionSampler
from trb_exp.trainer import prompt_batch, run

FAST = ["logger=none", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.eval_size=4",
        "trainer.eval_samples=1", "trainer.prompts_per_step=4", "trainer.max_new_tokens=12", "threads=1",
        "trainer.save_student=false"]


def _pair(tiny_pair):
    return [f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}"]


def _method(*overrides):
    cfg = compose(list(overrides))
    return Method.from_cfg(cfg.method, cfg.schedule)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- skd
def test_skd_replaces_exactly_the_proposals_outside_the_teachers_top_k():
    V, K = 8, 3
    # teacher logits with a known ranking per row: row b ranks token (b + j) % V at place j
    teacher = torch.empty(4, V)
    for b in range(4):
        for j in range(V):
            teacher[b, (b + j) % V] = -float(j)
    top = [{(b + j) % V for j in range(K)} for b in range(4)]  # the teacher's top-3 per row
    proposals = torch.tensor([0, 5, 3, 2])                      # in, out, in, out of top-3 (rows 0..3)
    expected = torch.tensor([p.item() not in top[b] for b, p in enumerate(proposals)])
    assert expected.tolist() == [False, True, False, True]
    # a near-zero teacher temperature makes the replacement the teacher's argmax, token b at row b
    rule = SKDSampler(K, teacher_temperature=1e-4, generator=torch.Generator().manual_seed(0))
    tokens, replaced = rule.correct(proposals, teacher)
    assert torch.equal(replaced, expected)
    assert torch.equal(tokens, torch.where(expected, torch.arange(4), proposals))
    # through the rule's call: a student sure of each proposal proposes it; the behaviour is one-hot
    student = torch.full((4, V), -1e4).scatter_(1, proposals[:, None], 0.0)
    logp, diag = rule(student, teacher)
    assert torch.equal(diag["replaced"], expected.float())
    assert torch.equal(logp.argmax(-1), tokens) and torch.equal(logp.exp().sum(-1), torch.ones(4))
    # top_k >= V accepts everything: SKD is then plain student sampling
    tokens, replaced = SKDSampler(V, generator=torch.Generator().manual_seed(0)).correct(proposals, teacher)
    assert not replaced.any() and torch.equal(tokens, proposals)


def test_skd_replacements_are_fresh_teacher_samples_at_its_temperature():
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).expand(20000, 4)
    proposals = torch.full((20000,), 3)  # always outside the teacher's top-2
    for temp in (1.0, 0.5):
        rule = SKDSampler(2, teacher_temperature=temp, generator=torch.Generator().manual_seed(1))
        tokens, replaced = rule.correct(proposals, teacher)
        assert replaced.all()
        want = torch.softmax(teacher[0] / temp, -1)
        freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
        torch.testing.assert_close(freq, want, atol=0.015, rtol=0)


def test_skd_rollout_keeps_only_teacher_top_k_tokens_unless_replaced(tiny_pair):
    tok = load_tokenizer(str(tiny_pair / "student"))
    cpu = torch.device("cpu")
    student = load_model(str(tiny_pair / "student"), device=cpu, train=False)
    teacher = load_model(str(tiny_pair / "teacher"), device=cpu, train=False)
    ids, mask = encode_prompts(tok, ["1+2=", "12*3-4=", "9-9*9+1=", "5="] * 4)
    gen = torch.Generator().manual_seed(0)
    rule = _method("method=skd", "method.teacher_top_k=3").sampler(0, 1.0, generator=gen)
    ro = sample(student, teacher, ids, mask, rule, max_new_tokens=12, eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id, generator=gen)
    m, rep = ro.response_mask, ro.diagnostics["replaced"].bool()
    in_top = (ro.teacher_logprobs.topk(3, -1).indices == ro.response_ids[..., None]).any(-1)
    assert in_top[m & ~rep].all()          # every accepted proposal is in the teacher's top-3
    assert 0 < rep[m].float().mean() < 1   # random pair: some proposals are replaced, not all


# --------------------------------------------------------------------------- temp_warmup
def test_temp_warmup_temperature_follows_its_schedule():
    K, t0 = 20, 0.8
    m = _method("method=temp_warmup", f"method.t0={t0}", f"method.K={K}")
    temps = [m.sampler(k, 1.0).temperature for k in (0, K // 2, K, K + 5)]
    assert temps == pytest.approx([0.8, 0.9, 1.0, 1.0])
    assert all(isinstance(m.sampler(k, 1.0), StudentSampler) for k in (0, K + 5))
    assert m.diagnostics(K // 2)["rollout/temperature"] == pytest.approx(0.9)
    # the rule samples from the tempered student; the loss stays on the temperature-1 student
    logits = torch.randn(3, 7)
    torch.testing.assert_close(m.sampler(0, 1.0)(logits, None)[0], torch.log_softmax(logits / 0.8, -1))
    t_lp = torch.log_softmax(torch.randn(3, 7), -1)
    opd = _method("method=opd")
    torch.testing.assert_close(m.per_token_loss(logits, t_lp, None, 0), opd.per_token_loss(logits, t_lp, None, 0))
    # plain methods sample at trainer.temperature at every step
    assert [opd.sampler(k, 0.7).temperature for k in (0, 100)] == [0.7, 0.7]


# --------------------------------------------------------------------------- veto
def test_veto_b_schedule_and_bridge_target():
    m = _method("method=veto", "method.b_start=0.4", "method.K=10")
    assert [m.objective.bridge_b(k) for k in (0, 5, 10, 15)] == pytest.approx([0.4, 0.7, 1.0, 1.0])
    assert [m.diagnostics(k)["veto/b"] for k in (0, 5)] == pytest.approx([0.4, 0.7])
    torch.manual_seed(0)
    s_logits = torch.randn(2, 5, 11, requires_grad=True)
    t_lp = torch.log_softmax(torch.randn(2, 5, 11), -1)
    # b = 1 (step >= K): the target is the teacher itself and the loss is OPD's
    assert m.objective.target_logprobs(s_logits, t_lp, 10) is t_lp
    opd = _method("method=opd")
    torch.testing.assert_close(m.per_token_loss(s_logits, t_lp, None, 12), opd.per_token_loss(s_logits, t_lp, None, 0))
    # b < 1: q_b ∝ pi_T^b sg(pi_S)^(1-b), which differs from pi_T and moves the loss
    q = m.objective.target_logprobs(s_logits, t_lp, 0)
    want = torch.log_softmax(0.4 * t_lp + 0.6 * torch.log_softmax(s_logits.detach(), -1), -1)
    torch.testing.assert_close(q, want)
    assert not q.requires_grad and (q - t_lp).abs().max() > 0.1
    assert not torch.allclose(m.per_token_loss(s_logits, t_lp, None, 0), opd.per_token_loss(s_logits, t_lp, None, 0))
    # by default b reaches 1 at the end of the run, as in the paper's code
    assert _method("method=veto", "trainer.max_steps=40").K == 40


# --------------------------------------------------------------------------- fixed_blend
def test_fixed_blend_budget_is_constant_and_ignores_the_schedule():
    m = _method("method=fixed_blend", "schedule.eps0=0.02", "schedule.warmup_steps=5")
    assert m.schedule.name == "constant"  # the preset composes the trust-region rule with schedule=constant
    rules = [m.sampler(k, 1.0) for k in range(0, 300, 7)]
    assert all(isinstance(r, TrustRegionSampler) and r.eps == 0.02 for r in rules)
    assert {m.diagnostics(k)["trb/eps"] for k in range(300)} == {0.02}
    trb = _method("method=trb", "schedule.eps0=0.7", "schedule.warmup_steps=5")  # the annealed contrast
    assert trb.behaviour.budget(0) == 0.7 and isinstance(trb.sampler(5, 1.0), StudentSampler)


# --------------------------------------------------------------------------- prompts and sft_warmup
def test_prompt_batch_is_a_pure_function_with_the_original_order():
    n, per = 10, 4
    # the loop's original epoch-shuffled stream: pop from a shuffled copy, reshuffle when empty
    order, idx, want = random.Random(3), [], []
    for _ in range(6):
        batch = []
        while len(batch) < per:
            if not idx:
                idx = list(range(n))
                order.shuffle(idx)
            batch.append(idx.pop())
        want.append(batch)
    assert [prompt_batch(3, s, n, per) for s in range(6)] == want
    assert [prompt_batch(3, s, n, per) for s in reversed(range(6))] == want[::-1]  # no hidden state
    assert sorted(sum(want, [])[:n]) == list(range(n))  # each epoch is a permutation


def _recording(monkeypatch, module, calls, tok_holder):
    real = module.sample

    def rec(student, teacher, ids, mask, rule, **kw):
        tok = tok_holder[0]
        prompts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(ids, mask)]
        calls.append((type(rule).__name__, prompts))
        return real(student, teacher, ids, mask, rule, **kw)

    monkeypatch.setattr(module, "sample", rec)


def _dedupe(prompts, n):
    assert all(prompts[i] == prompts[i - i % n] for i in range(len(prompts)))  # n copies in a row
    return prompts[::n]


@pytest.mark.slow
def test_sft_warmup_uses_exactly_the_prompts_of_the_first_N_steps(tiny_pair, tmp_path, monkeypatch):
    tok_holder = [load_tokenizer(str(tiny_pair / "student"))]
    N, n, M, R = 3, 2, 2, 2
    base = [*FAST, *_pair(tiny_pair), "trainer.max_steps=4", f"trainer.rollouts_per_prompt={R}"]
    calls = []
    _recording(monkeypatch, warm_mod, calls, tok_holder)
    _recording(monkeypatch, train_mod, calls, tok_holder)
    run(compose(["method=sft_warmup", f"method.sft_steps={N}", f"method.sft_samples={n}",
                 f"method.sft_updates={M}", *base]), tmp_path / "sft")
    sft = [p for name, ps in calls if name == "TeacherSampler" for p in _dedupe(ps, n)]
    opd_phase = [_dedupe(ps, R) for name, ps in calls if name == "StudentSampler"]
    assert len(opd_phase) == 4 and len(sft) == N * 4
    assert sft == [p for step in opd_phase[:N] for p in step]  # the first N steps' prompts, in order
    rows = [r for r in _rows(tmp_path / "sft") if "sft/loss" in r]
    assert [r["sft/update"] for r in rows] == list(range(1, M + 1)) and all(r["step"] == 0 for r in rows)
    assert rows[0]["sft/responses"] == N * 4 * n
    # the OPD phase draws the same prompts in the same order as plain OPD with the same seed
    calls.clear()
    run(compose(["method=opd", *base]), tmp_path / "opd")
    assert [_dedupe(ps, R) for _, ps in calls] == opd_phase


# --------------------------------------------------------------------------- offline_kd
class _Exploding(torch.nn.Module):
    def forward(self, *a, **k):
        raise AssertionError("the student was called while sampling")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "forward_kl"])
def test_offline_kd_student_never_samples(loss, tiny_pair, tmp_path, monkeypatch):
    real = train_mod.sample
    rollouts = []

    def guarded(student, teacher, *a, **kw):  # any student call inside the decode loop raises
        ro = real(_Exploding(), teacher, *a, **kw)
        rollouts.append(ro)
        return ro

    def no_second_pass(*a, **kw):
        raise AssertionError("the teacher log-probs must come from the teacher's rollout")

    monkeypatch.setattr(train_mod, "sample", guarded)
    monkeypatch.setattr(teacher_pass_mod, "teacher_logprobs", no_second_pass)  # TeacherTargets' teacher pass
    run(compose(["method=offline_kd", f"method.loss={loss}", *FAST, *_pair(tiny_pair)]), tmp_path)
    assert len(rollouts) == 3 and all(ro.token_logprobs_student is None for ro in rollouts)
    assert all((ro.teacher_logprobs is not None) == (loss == "forward_kl") for ro in rollouts)
    rows = [r for r in _rows(tmp_path) if "train/loss" in r]
    assert len(rows) == 3 and all(r["train/loss"] > 0 for r in rows)
    assert "rollout/student_logprob" not in rows[0]


def test_offline_kd_forward_kl_is_token_level_kl_to_the_teacher():
    m = _method("method=offline_kd", "method.loss=forward_kl")
    s, t = torch.randn(2, 3, 9), torch.log_softmax(torch.randn(2, 3, 9), -1)
    want = (t.exp() * (t - torch.log_softmax(s, -1))).sum(-1)
    torch.testing.assert_close(m.per_token_loss(s, t, torch.zeros(2, 3, dtype=torch.long)), want)
    assert isinstance(m.sampler(0, 1.0), TeacherSampler)


# --------------------------------------------------------------------------- estimators
@pytest.mark.slow
def test_sampled_estimator_logs_a_kl_estimate_not_the_surrogate(tiny_pair, tmp_path):
    m = _method("method=opd", "method.estimator=sampled")
    s, t = torch.randn(2, 3, 9), torch.log_softmax(torch.randn(2, 3, 9), -1)
    y = torch.randint(0, 9, (2, 3))
    torch.testing.assert_close(m.kl_estimate(s, t, y), losses.sampled_kl_estimate(s, t, y))
    assert m.logs_kl_estimate and not _method("method=opd").logs_kl_estimate
    run(compose(["method=opd", "method.estimator=sampled", *FAST, *_pair(tiny_pair)]), tmp_path)
    rows = [r for r in _rows(tmp_path) if "train/loss" in r]
    assert all("train/kl_estimate" in r for r in rows)
    assert any(r["train/kl_estimate"] != r["train/loss"] for r in rows)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("method, overrides, keys", [
    ("fixed_blend", ["schedule.eps0=0.01"], ["trb/eps", "trb/beta_mean", "trb/kl_behavior_student_max"]),
    ("skd", ["method.teacher_top_k=3"], ["skd/replaced_frac"]),
    ("veto", ["method.b_start=0.4"], ["veto/b"]),
    ("temp_warmup", ["method.t0=0.8", "method.K=2"], ["rollout/temperature"]),
    ("sft_warmup", ["method.sft_steps=2", "method.sft_samples=2", "method.sft_updates=2"], []),
    ("offline_kd", ["method.loss=forward_kl"], ["rollout/teacher_entropy"]),
])
def test_each_new_method_runs_and_logs_its_diagnostics(method, overrides, keys, tiny_pair, tmp_path, monkeypatch):
    cfg = compose([f"method={method}", *(f"{o}" for o in overrides), *FAST, *_pair(tiny_pair)])
    rollouts = record_rollouts(monkeypatch, train_mod)
    summary = run(cfg, tmp_path)
    rows = _rows(tmp_path)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3] and summary["method"] == method
    assert all(k in r for r in train_rows for k in keys)
    if method == "fixed_blend":
        assert [r["trb/eps"] for r in train_rows] == [0.01] * 3
        assert all(r["trb/kl_behavior_student_max"] <= 0.01 + 1e-6 for r in train_rows)
        assert len(rollouts) == 3 and all(assert_budget_used(ro, eps=0.01) > 0 for ro in rollouts)
    if method == "skd":
        assert all(0 <= r["skd/replaced_frac"] <= 1 for r in train_rows)
        assert any(r["skd/replaced_frac"] > 0 for r in train_rows)
    if method == "veto":  # K defaults to the run length: b = 0.4 + 0.6 k / 3
        assert [r["veto/b"] for r in train_rows] == pytest.approx([0.4, 0.6, 0.8])
    if method == "temp_warmup":
        assert [r["rollout/temperature"] for r in train_rows] == pytest.approx([0.8, 0.9, 1.0])
    if method == "sft_warmup":
        sft = [r for r in rows if "sft/loss" in r]
        assert len(sft) == 2 and all(r["step"] == 0 and r["sft/loss"] > 0 for r in sft)
        assert rows.index(sft[0]) > 0 and "eval/pass@1" in rows[0]  # initial eval before the SFT


@pytest.mark.parametrize("method, override, message", [
    ("skd", "method.teacher_top_k=0", "method.teacher_top_k=0: "),
    ("skd", "method.teacher_temperature=0", "method.teacher_temperature=0.0: "),
    ("veto", "method.b_start=0", "method.b_start=0.0: "),
    ("temp_warmup", "method.t0=-1", "method.t0=-1.0: "),
    ("temp_warmup", "method.K=-1", "method.K=-1: "),
    ("fixed_blend", "schedule.eps0=-0.1", "schedule.eps0=-0.1: "),
    ("fixed_blend", "schedule.eps0=nan", "schedule.eps0=nan: must be a finite number"),
    ("sft_warmup", "method.sft_updates=-1", "method.sft_updates=-1: "),
    ("opd", "+method.eps=0.1", "method.eps=0.1: fixed_blend's constant budget is now the schedule's: use "
                               "schedule=constant schedule.eps0=<eps>"),
    ("opd", "+method.teacher_top_k=3", "method.teacher_top_k=3: not a knob of rollout=student or loss=reverse_kl"),
    ("opd", "method.rollout=nope", "method.rollout='nope': choose one of "),
    ("opd", "method.loss=nope", "method.loss='nope': choose one of reverse_kl, forward_kl, ce"),
])
def test_method_config_errors_name_the_field(method, override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as e:
        _method(f"method={method}", override)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
