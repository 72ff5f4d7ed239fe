import torch
from budget import assert_budget_used

from trb_exp.data import encode_prompts
from trb_exp.models import load_model, load_tokenizer
from trb_exp.decode.backend import sample
from trb_exp.decode.forward import response_logits
from trb_exp.decode.teacher_pass import teacher_logprobs
from trb_exp.rules import GreedySampler, StudentSampler, TeacherSampler, TrustRegionSampler

PROMPTS = ["1+2=", "12*3-4=", "9-9*9+1=", "5="]


def _setup(tiny_pair):
    tok = load_tokenizer(str(tiny_pair / "student"))
    cpu = torch.device("cpu")
    student = load_model(str(tiny_pair / "student"), device=cpu, train=False)
    teacher = load_model(str(tiny_pair / "teacher"), device=cpu, train=False)
    ids, mask = encode_prompts(tok, PROMPTS)
    return tok, student, teacher, ids, mask


def _sample(tok, student, teacher, ids, mask, rule, seed=0, n=12):
    return sample(student, teacher, ids, mask, rule, max_new_tokens=n, eos_id=tok.eos_token_id,
                  pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))


def test_kv_cached_decoding_matches_full_forward(tiny_pair):
    """The teacher log-probs collected step by step with the KV cache (left padding included)
    equal one full forward over the finished sequences."""
    tok, student, teacher, ids, mask = _setup(tiny_pair)
    ro = _sample(tok, student, teacher, ids, mask, TrustRegionSampler(eps=0.05))
    full = teacher_logprobs(teacher, ro)
    m = ro.response_mask
    assert ro.teacher_logprobs.shape == full.shape
    torch.testing.assert_close(ro.teacher_logprobs[m], full[m], atol=1e-5, rtol=1e-5)
    # and the student's sampled-token log-probs match its full forward too
    s_full = torch.log_softmax(response_logits(student, ro.input_ids, ro.attention_mask, ro.prompt_len), -1)
    s_tok = s_full.gather(-1, ro.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(ro.token_logprobs_student[m], s_tok[m], atol=1e-5, rtol=1e-5)


def test_response_masks_stop_at_eos(tiny_pair):
    tok, student, teacher, ids, mask = _setup(tiny_pair)
    ro = _sample(tok, student, teacher, ids, mask, StudentSampler(), n=30)
    for row, m, fin in zip(ro.response_ids, ro.response_mask, ro.finished):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        if fin:
            assert row[n - 1] == tok.eos_token_id and (row[n:] == tok.pad_token_id).all()
        else:
            assert n == row.shape[0] and tok.eos_token_id not in row.tolist()
    assert ro.teacher_logprobs is None  # OPD: the teacher does not decode


def test_rules_decide_which_models_run(tiny_pair):
    tok, student, teacher, ids, mask = _setup(tiny_pair)
    ro = _sample(tok, None, teacher, ids, mask, TeacherSampler())  # the student is never called
    assert ro.token_logprobs_student is None and ro.teacher_logprobs is not None
    g1 = _sample(tok, student, None, ids, mask, GreedySampler(), seed=1)
    g2 = _sample(tok, student, None, ids, mask, GreedySampler(), seed=2)
    assert torch.equal(g1.input_ids, g2.input_ids)


def test_trust_region_rule_respects_budget_and_zero_budget_is_student(tiny_pair):
    tok, student, teacher, ids, mask = _setup(tiny_pair)
    ro = _sample(tok, student, teacher, ids, mask, TrustRegionSampler(eps=0.02))
    d, m = ro.diagnostics, ro.response_mask
    assert (d["kl_behavior_student"][m] <= 0.02 + 1e-6).all()
    assert (d["beta"][m] > 0).all()
    assert assert_budget_used(ro, eps=0.02) == 0  # the tiny pair's KL(pi_T||pi_S) < 0.02: beta = 1 everywhere
    # a budget that binds on part of the tokens: where beta < 1 the whole budget is spent
    ro = _sample(tok, student, teacher, ids, mask, TrustRegionSampler(eps=0.01))
    n_below = assert_budget_used(ro, eps=0.01)
    assert 0 < n_below < int(ro.response_mask.sum())
    # eps = 0 gives exactly the student's samples with the same generator
    a = _sample(tok, student, teacher, ids, mask, TrustRegionSampler(eps=0.0), seed=3)
    b = _sample(tok, student, teacher, ids, mask, StudentSampler(), seed=3)
    assert torch.equal(a.input_ids, b.input_ids)
    # a relative budget is a fraction of KL(pi_T || pi_S) at each prefix
    r = _sample(tok, student, teacher, ids, mask, TrustRegionSampler(eps=0.5, budget="relative"))
    assert (r.diagnostics["kl_behavior_student"][r.response_mask] <= r.diagnostics["eps"][r.response_mask] + 1e-6).all()
    assert assert_budget_used(r) > 0
