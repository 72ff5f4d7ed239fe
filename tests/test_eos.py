"""EOS canonicalisation: a student and a teacher that end sequences with different ids (a Base
student's <|endoftext|>, an instruct teacher's <|im_end|>) share ONE end-of-sequence event, placed at
the student's EOS id, in both distributions: in the decode loop (every rule, the TRB solver and its KL
budget included), in the emitted token, and in the training loss.

The tiny pair here uses the char tokenizer; the teacher ends sequences with <unk> instead of <eos>."""

import json
import math

import pytest
import torch
from budget import assert_budget_used
from conftest import compose

from trb_exp.blending import kl_divergence, merge_eos, trust_region_blend
from trb_exp.data import encode_prompts
from trb_exp.data.tokenizer import build_char_tokenizer
from trb_exp.methods import Method
from trb_exp.models import load_model, load_tokenizer, pair_eos_ids, tiny_llama
from trb_exp.decode.backend import sample
from trb_exp.decode.forward import response_logits
from trb_exp.rules import StudentSampler, TeacherSampler, TrustRegionSampler

NINF = float("-inf")
PROMPTS = ["1+2=", "12*3-4=", "9-9*9+1=", "5=", "7*7=", "3-8="]


# ------------------------------------------------------------------------------------ the pure function
def test_merge_eos_matches_hand_computation():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    got = merge_eos(p.log(), eos_ids=[3, 1], keep_id=1)
    want = torch.tensor([[0.1, 0.2 + 0.4, 0.3, 0.0], [0.25, 0.5, 0.25, 0.0]], dtype=torch.float64).log()
    torch.testing.assert_close(got, want)
    assert torch.isneginf(got[:, 3]).all() and got.exp().sum(-1).sub(1).abs().max() < 1e-12
    # on logits: the softmax of the merged logits is the merged distribution (normaliser preserved)
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    m = merge_eos(logits, eos_ids=(0, 3), keep_id=3)
    pr = torch.softmax(logits, -1)
    torch.testing.assert_close(torch.softmax(m, -1), torch.stack([pr[0] * 0, pr[1], pr[2], pr[0] + pr[3], pr[4]]))
    assert m[0] == NINF and m[3] == pytest.approx(math.log(math.exp(2.0) + math.exp(3.0)))
    # keep_id need not be listed; three ids; batch dims; input untouched
    x = torch.randn(2, 3, 7)
    x0 = x.clone()
    y = merge_eos(x, eos_ids=[5, 6], keep_id=0)
    torch.testing.assert_close(y[..., 0], torch.logsumexp(x[..., [0, 5, 6]], -1))
    assert torch.isneginf(y[..., 5:]).all() and torch.equal(y[..., 1:5], x[..., 1:5]) and torch.equal(x, x0)


def test_merge_eos_is_free_for_a_single_id_and_idempotent():
    x = torch.randn(4, 9)
    assert merge_eos(x, [2], 2) is x and merge_eos(x, (), 2) is x and merge_eos(x, [2, 2], 2) is x
    once = merge_eos(x, [2, 7], 2)
    torch.testing.assert_close(merge_eos(once, [2, 7], 2), once)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        merge_eos(x, [2, 9], 2)


def test_merge_eos_gradient_flows_to_both_eos_logits():
    x = torch.randn(3, 6, requires_grad=True)
    tgt = torch.log_softmax(torch.randn(3, 6), -1)
    loss = torch.nn.functional.kl_div(torch.log_softmax(merge_eos(x, [1, 4], 1), -1).clamp_min(-1e3),
                                      merge_eos(tgt, [1, 4], 1).clamp_min(-1e3), log_target=True,
                                      reduction="sum")
    loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, [1, 4]] != 0).all()


# ------------------------------------------------------------------------------------ a pair with two EOS ids
@pytest.fixture(scope="module")
def eos_pair(tmp_path_factory):
    """Student ends with <eos> (id 2); the teacher's tokenizer and generation config end with <unk> (id 3)."""
    root = tmp_path_factory.mktemp("eos_pair")
    s_tok = build_char_tokenizer()
    t_tok = build_char_tokenizer()
    t_tok.eos_token = "<unk>"
    for role, tok, (hidden, layers) in [("student", s_tok, (16, 1)), ("teacher", t_tok, (32, 2))]:
        m = tiny_llama(tok, hidden=hidden, layers=layers, heads=2, intermediate=2 * hidden, seed=len(role))
        m.generation_config.eos_token_id = tok.eos_token_id
        m.save_pretrained(root / role)
        tok.save_pretrained(root / role)
    return root


class Biased(torch.nn.Module):
    """A model whose logit of one token is raised by ``bias`` (to make the teacher's EOS likely)."""

    def __init__(self, model, token_id, bias):
        super().__init__()
        self.model, self.token_id, self.bias = model, token_id, bias

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits[..., self.token_id] += self.bias
        return out


def _load(eos_pair):
    cpu = torch.device("cpu")
    s_tok, t_tok = load_tokenizer(str(eos_pair / "student")), load_tokenizer(str(eos_pair / "teacher"))
    student = load_model(str(eos_pair / "student"), device=cpu, train=False)
    teacher = load_model(str(eos_pair / "teacher"), device=cpu, train=False)
    return s_tok, t_tok, student, teacher


def test_pair_eos_ids(eos_pair):
    s_tok, t_tok, student, teacher = _load(eos_pair)
    eos, unk = s_tok.convert_tokens_to_ids(["<eos>", "<unk>"])
    assert t_tok.eos_token_id == unk and teacher.generation_config.eos_token_id == unk
    assert pair_eos_ids(s_tok, t_tok, student, teacher) == (eos, (eos, unk))
    assert pair_eos_ids(s_tok, s_tok, student, student) == (eos, (eos,))  # one id: nothing to merge


def _sample(s_tok, student, teacher, rule, eos_ids, seed=0, n=30):
    ids, mask = encode_prompts(s_tok, PROMPTS)
    return sample(student, teacher, ids, mask, rule, max_new_tokens=n, eos_id=s_tok.eos_token_id,
                  pad_id=s_tok.pad_token_id, generator=torch.Generator().manual_seed(seed), eos_ids=eos_ids)


def _check_stops_on_student_eos(ro, eos, unk):
    assert ro.finished.any()
    for row, m, fin in zip(ro.response_ids, ro.response_mask, ro.finished):
        n = int(m.sum())
        assert unk not in row[:n].tolist()  # the teacher's EOS id is never emitted
        if fin:
            assert row[n - 1] == eos and eos not in row[: n - 1].tolist()
        else:
            assert eos not in row.tolist()


def test_teacher_rule_stops_on_the_merged_event_and_emits_the_student_eos(eos_pair):
    s_tok, t_tok, student, teacher = _load(eos_pair)
    eos, unk = s_tok.eos_token_id, t_tok.eos_token_id
    teacher = Biased(teacher, unk, 4.0)  # the teacher now ends most sequences within a few tokens
    ro = _sample(s_tok, None, teacher, TeacherSampler(), eos_ids=(eos, unk))
    _check_stops_on_student_eos(ro, eos, unk)
    assert ro.finished.all() and ro.response_mask.sum(1).float().mean() < 10
    # the stored teacher log-probs are the merged distribution
    t = ro.teacher_logprobs[ro.response_mask]
    assert torch.isneginf(t[:, unk]).all() and (t.exp().sum(-1) - 1).abs().max() < 1e-5
    # without the merge the teacher's <unk> is emitted and does not end the sequence
    raw = _sample(s_tok, None, teacher, TeacherSampler(), eos_ids=())
    assert (raw.response_ids == unk).any() and not raw.finished.all()


def test_trust_region_rule_blends_the_merged_distributions(eos_pair):
    s_tok, t_tok, student, teacher = _load(eos_pair)
    eos, unk = s_tok.eos_token_id, t_tok.eos_token_id
    teacher = Biased(teacher, unk, 3.0)
    eps = 0.05
    ro = _sample(s_tok, student, teacher, TrustRegionSampler(eps=eps), eos_ids=(eos, unk))
    _check_stops_on_student_eos(ro, eos, unk)
    m = ro.response_mask
    d = ro.diagnostics
    assert (d["kl_behavior_student"][m] <= eps + 1e-6).all() and (d["beta"][m] > 0).all()
    assert assert_budget_used(ro, eps=eps) > 0

    # recompute both models' distributions over the finished sequences with full forwards, merge them,
    # and solve again: same beta and realised KL as in the decode loop, and KL(mu||pi_S) <= eps holds
    # on the MERGED distributions
    s_raw = response_logits(student, ro.input_ids, ro.attention_mask, ro.prompt_len)[m]
    t_raw = torch.log_softmax(response_logits(teacher, ro.input_ids, ro.attention_mask, ro.prompt_len)[m], -1)
    s_m, t_m = merge_eos(s_raw, [eos, unk], eos), merge_eos(t_raw, [eos, unk], eos)
    torch.testing.assert_close(ro.teacher_logprobs[m], t_m, atol=1e-5, rtol=1e-5)
    res = trust_region_blend(s_m, t_m, eps)
    torch.testing.assert_close(res.beta, d["beta"][m], atol=1e-4, rtol=0)
    torch.testing.assert_close(res.kl, d["kl_behavior_student"][m], atol=1e-6, rtol=1e-3)
    kl = kl_divergence(res.logprobs, torch.log_softmax(s_m, -1))
    assert (kl <= eps + 1e-6).all()
    assert torch.isneginf(res.logprobs[:, unk]).all()  # mu puts the whole EOS event on the student's id
    # the merge matters: solved on the raw distributions the blend differs (the teacher's <unk> mass is
    # a separate token the student barely predicts)
    raw = trust_region_blend(s_raw, t_raw, eps)
    assert (raw.beta - res.beta).abs().max() > 1e-3


def test_a_single_eos_id_changes_nothing(eos_pair):
    s_tok, _, student, teacher = _load(eos_pair)
    eos = s_tok.eos_token_id
    for rule in (StudentSampler(), TrustRegionSampler(eps=0.05)):
        a = _sample(s_tok, student, teacher, rule, eos_ids=(), seed=4)
        b = _sample(s_tok, student, teacher, rule, eos_ids=(eos,), seed=4)
        assert torch.equal(a.input_ids, b.input_ids)


# ------------------------------------------------------------------------------------ the training loss
@pytest.mark.slow
@pytest.mark.parametrize("method", ["opd", "trb"])
def test_training_loss_sees_merged_distributions(method, eos_pair, tmp_path, monkeypatch):
    """OPD takes the teacher from one batched pass after decoding, TRB from the decode loop: in both
    the loss receives student logits and teacher log-probs with the EOS event merged at <eos>."""
    from trb_exp.trainer import run

    s_tok = load_tokenizer(str(eos_pair / "student"))
    eos, unk = s_tok.convert_tokens_to_ids(["<eos>", "<unk>"])
    seen = []
    original = Method.per_token_loss

    def spy(self, student_logits, teacher_logprobs, tokens, *args, **kw):
        seen.append((student_logits.detach().clone(), teacher_logprobs.clone(), tokens.clone()))
        return original(self, student_logits, teacher_logprobs, tokens, *args, **kw)

    monkeypatch.setattr(Method, "per_token_loss", spy)
    cfg = compose([f"method={method}", "logger=none", "trainer.max_steps=2", "trainer.eval_every=0",
                   "trainer.eval_size=4", "trainer.eval_samples=1", "trainer.prompts_per_step=4",
                   "trainer.max_new_tokens=12", "threads=1", "trainer.save_student=false",
                   f"model.student={eos_pair / 'student'}", f"model.teacher={eos_pair / 'teacher'}"])
    run(cfg, tmp_path)
    assert len(seen) == 2
    for s_logits, t_lp, tokens in seen:
        assert torch.isneginf(s_logits[..., unk]).all() and torch.isfinite(s_logits[..., eos]).all()
        assert torch.isneginf(t_lp[..., unk]).all() and torch.isfinite(t_lp[..., eos]).all()
        assert (t_lp.exp().sum(-1) - 1).abs().max() < 1e-4
        assert not (tokens == unk).any()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in rows
               if "train/loss" in r)
