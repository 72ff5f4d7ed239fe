"""Tests for trb_exp.losses: every estimator vs an independent numpy/float64 reference, directions,
edge cases (-inf / nan / padding), gradients and gradient-accumulation invariance."""

import math

import numpy as np
import pytest
import torch

from trb_exp import losses as L
from trb_exp.losses import (
    LOGPROB_FLOOR,
    cross_entropy,
    generalized_jsd,
    geometric_bridge_target,
    kl_student_teacher_full,
    kl_student_teacher_sampled,
    kl_student_teacher_topk,
    kl_student_teacher_topk_gathered,
    kl_teacher_student_full,
    masked_token_mean,
    sampled_kl_estimate,
)


# ------------------------------------------------------------------------------------------------------
# independent numpy float64 references (do not use the module's helpers)
# ------------------------------------------------------------------------------------------------------
def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_kl(logp, logq):
    """KL(p||q) over the last axis with 0*log0 = 0."""
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (logp - logq), 0.0)
    return terms.sum(-1)


def np_topk_kl(s_logits, t_logprobs, k):
    ids = np.argsort(-s_logits, axis=-1, kind="stable")[..., :k]
    s = np.take_along_axis(s_logits, ids, -1)
    t = np.take_along_axis(t_logprobs, ids, -1)
    return np_kl(np_log_softmax(s), np_log_softmax(t))


def np_gjsd_scaled(s_logits, t_logprobs, beta):
    ps = np.exp(np_log_softmax(s_logits))
    pt = np.exp(np_log_softmax(t_logprobs))
    m = beta * pt + (1 - beta) * ps
    j = beta * np.sum(pt * np.log(pt / m), -1) + (1 - beta) * np.sum(ps * np.log(ps / m), -1)
    return j / (beta * (1 - beta))


def rand_inputs(shape=(2, 3, 7), seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    t = torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, -1)
    return s.to(dtype), t.to(dtype)


def tt(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------
# estimators vs numpy
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_full_kls_match_numpy(dtype, tol):
    s, t = rand_inputs(dtype=dtype)
    sn, tn = s.double().numpy(), t.double().numpy()
    rev = kl_student_teacher_full(s, t)
    fwd = kl_teacher_student_full(s, t)
    assert rev.shape == (2, 3) and rev.dtype == dtype
    np.testing.assert_allclose(rev.double().numpy(), np_kl(np_log_softmax(sn), np_log_softmax(tn)), atol=tol)
    np.testing.assert_allclose(fwd.double().numpy(), np_kl(np_log_softmax(tn), np_log_softmax(sn)), atol=tol)


def test_full_reverse_kl_gradient_matches_analytic():
    s, t = rand_inputs()
    s.requires_grad_(True)
    kl_student_teacher_full(s, t).sum().backward()
    lp = np_log_softmax(s.detach().numpy())
    p = np.exp(lp)
    d = lp - t.numpy()
    expected = p * (d - np.sum(p * d, -1, keepdims=True))  # d/dz KL(softmax(z) || q)
    np.testing.assert_allclose(s.grad.numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_matches_numpy(k):
    s, t = rand_inputs(seed=1)
    got = kl_student_teacher_topk(s, t, k=k)
    np.testing.assert_allclose(got.numpy(), np_topk_kl(s.numpy(), t.numpy(), k), atol=1e-10)


def test_topk_gathered_matches_numpy_and_topk():
    s, t = rand_inputs(seed=2)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(7)[:4] for _ in range(6)]).reshape(2, 3, 4)
    t_on = np.take_along_axis(t.numpy(), ids, -1) + 3.0  # additive constant must not matter
    got = kl_student_teacher_topk_gathered(s, torch.from_numpy(ids), tt(t_on))
    ref = np_kl(np_log_softmax(np.take_along_axis(s.numpy(), ids, -1)), np_log_softmax(t_on))
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10)
    # with the student's own top-k ids it is the topk estimator
    top = s.topk(4, -1).indices
    np.testing.assert_allclose(
        kl_student_teacher_topk_gathered(s, top, t.gather(-1, top)).numpy(),
        kl_student_teacher_topk(s, t, k=4).numpy(), atol=1e-12)


def test_topk_gradient_only_on_support():
    s, t = rand_inputs(seed=3)
    s.requires_grad_(True)
    kl_student_teacher_topk(s, t, k=2).sum().backward()
    top = s.detach().topk(2, -1).indices
    off = torch.ones_like(s, dtype=torch.bool).scatter(-1, top, False)
    assert torch.all(s.grad[off] == 0) and s.grad.abs().sum() > 0


def test_topk_equals_full_when_k_ge_V_and_differs_below():
    s, t = rand_inputs(seed=4)
    full = kl_student_teacher_full(s, t)
    torch.testing.assert_close(kl_student_teacher_topk(s, t, k=7), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(kl_student_teacher_topk(s, t, k=100), full, atol=1e-12, rtol=0)
    # constructed: student top-2 = tokens {0,1}, teacher agrees there (same ratio) but puts mass elsewhere
    s2 = torch.log(tt([[0.5, 0.3, 0.1, 0.1]]))
    t2 = torch.log(tt([[0.25, 0.15, 0.3, 0.3]]))
    k2 = kl_student_teacher_topk(s2, t2, k=2)
    f2 = kl_student_teacher_full(s2, t2)
    assert abs(k2.item()) < 1e-12  # renormalised on {0,1}: identical
    assert f2.item() > 0.1


def test_sampled_surrogate_and_estimate_values():
    s, t = rand_inputs(seed=5)
    tok = torch.tensor([[0, 6, 3], [2, 2, 5]])
    lps = np.take_along_axis(np_log_softmax(s.numpy()), tok.numpy()[..., None], -1)[..., 0]
    lpt = np.take_along_axis(t.numpy(), tok.numpy()[..., None], -1)[..., 0]
    np.testing.assert_allclose(kl_student_teacher_sampled(s, t, tok).numpy(), (lps - lpt) * lps, atol=1e-10)
    est = sampled_kl_estimate(s.requires_grad_(True), t, tok)
    assert not est.requires_grad
    np.testing.assert_allclose(est.numpy(), lps - lpt, atol=1e-10)


def test_sampled_surrogate_gradient_is_advantage_times_score():
    s, t = rand_inputs(seed=6)
    tok = torch.tensor([[1, 4, 0], [6, 3, 3]])
    s1 = s.clone().requires_grad_(True)
    kl_student_teacher_sampled(s1, t, tok).sum().backward()
    # independent: (log pS(y) - log pT(y)) * d log pS(y)/dz, with d log pS(y)/dz = onehot(y) - pS
    lp = np_log_softmax(s.numpy())
    adv = np.take_along_axis(lp - t.numpy(), tok.numpy()[..., None], -1)
    score = np.eye(7)[tok.numpy()] - np.exp(lp)
    np.testing.assert_allclose(s1.grad.numpy(), adv * score, atol=1e-10)
    # and via autograd of log pS(y)
    s2 = s.clone().requires_grad_(True)
    lpy = torch.log_softmax(s2, -1).gather(-1, tok[..., None])[..., 0]
    (lpy * (lpy - t.gather(-1, tok[..., None])[..., 0]).detach()).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_sampled_surrogate_monte_carlo_matches_full_reverse_kl_gradient():
    g = torch.Generator().manual_seed(123)
    V, N = 5, 50_000
    z = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    zf = z.clone().requires_grad_(True)
    kl_student_teacher_full(zf, t).backward()
    zs = z.clone().requires_grad_(True)
    tokens = torch.multinomial(torch.softmax(z, -1), N, replacement=True, generator=g)[None]  # [1, N]
    logits = zs.expand(1, N, V)
    kl_student_teacher_sampled(logits, t.expand(1, N, V), tokens).mean().backward()
    torch.testing.assert_close(zs.grad, zf.grad, atol=0.02, rtol=0)
    est = sampled_kl_estimate(logits, t.expand(1, N, V), tokens).mean()
    assert abs(est.item() - kl_student_teacher_full(z, t).item()) < 0.02


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_numpy(beta):
    s, t = rand_inputs(seed=7)
    got = generalized_jsd(s, t, beta=beta)
    np.testing.assert_allclose(got.numpy(), np_gjsd_scaled(s.numpy(), t.numpy(), beta), atol=1e-10)
    # relation to TRL's unscaled value
    ps, pt = torch.softmax(s, -1), t.exp()
    m = beta * pt + (1 - beta) * ps
    trl = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    torch.testing.assert_close(got * beta * (1 - beta), trl)


def test_generalized_jsd_endpoints_and_continuity():
    s, t = rand_inputs(seed=8)
    fwd, rev = kl_teacher_student_full(s, t), kl_student_teacher_full(s, t)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), fwd, atol=0, rtol=0)
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), rev, atol=0, rtol=0)
    torch.testing.assert_close(generalized_jsd(s, t, beta=1e-5), fwd, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(generalized_jsd(s, t, beta=1 - 1e-5), rev, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        generalized_jsd(s, t, beta=1.5)


def test_cross_entropy_matches_numpy_and_ignores_out_of_range():
    s, _ = rand_inputs(seed=9)
    tgt = torch.tensor([[0, 6, -100], [3, 7, 2]])
    s.requires_grad_(True)
    ce = cross_entropy(s, tgt)
    lp = np_log_softmax(s.detach().numpy())
    ref = -np.take_along_axis(lp, np.clip(tgt.numpy(), 0, 6)[..., None], -1)[..., 0]
    ref[0, 2] = ref[1, 1] = 0.0
    np.testing.assert_allclose(ce.detach().numpy(), ref, atol=1e-10)
    ce.sum().backward()
    assert torch.all(s.grad[0, 2] == 0) and torch.all(s.grad[1, 1] == 0)


# ------------------------------------------------------------------------------------------------------
# identities and directions
# ------------------------------------------------------------------------------------------------------
def test_all_divergences_zero_for_identical_inputs():
    s, _ = rand_inputs(seed=10, dtype=torch.float32)
    t = torch.log_softmax(s, -1)
    tok = torch.tensor([[0, 1, 2], [3, 4, 5]])
    outs = {
        "rev": kl_student_teacher_full(s, t),
        "fwd": kl_teacher_student_full(s, t),
        "topk": kl_student_teacher_topk(s, t, k=3),
        "topk_full": kl_student_teacher_topk(s, t, k=7),
        "gathered": kl_student_teacher_topk_gathered(s, tok[..., None], t.gather(-1, tok[..., None])),
        "sampled": kl_student_teacher_sampled(s, t, tok),
        "estimate": sampled_kl_estimate(s, t, tok),
    }
    for beta in (0.0, 0.3, 0.5, 1.0):
        outs[f"jsd{beta}"] = generalized_jsd(s, t, beta=beta)
    for name, v in outs.items():
        assert torch.allclose(v, torch.zeros_like(v), atol=1e-5), name


def test_kl_directions_on_hand_made_two_token_example():
    # p = (0.9, 0.1) is the student, q = (0.5, 0.5) the teacher.
    # KL(p||q) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.9*0.5877867 + 0.1*(-1.6094379) = 0.3680642
    # KL(q||p) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = -0.2938933 + 0.8047190         = 0.5108256
    KL_PQ, KL_QP = 0.3680642, 0.5108256
    s = torch.tensor([[[math.log(0.9), math.log(0.1)]]], dtype=torch.float64)  # [1,1,2]
    t = torch.tensor([[[math.log(0.5), math.log(0.5)]]], dtype=torch.float64)
    assert kl_student_teacher_full(s, t).item() == pytest.approx(KL_PQ, abs=1e-6)
    assert kl_teacher_student_full(s, t).item() == pytest.approx(KL_QP, abs=1e-6)
    assert kl_student_teacher_topk(s, t, k=2).item() == pytest.approx(KL_PQ, abs=1e-6)
    ids = torch.tensor([[[1, 0]]])
    assert kl_student_teacher_topk_gathered(s, ids, t.gather(-1, ids)).item() == pytest.approx(KL_PQ, abs=1e-6)
    assert generalized_jsd(s, t, beta=1.0).item() == pytest.approx(KL_PQ, abs=1e-6)
    assert generalized_jsd(s, t, beta=0.0).item() == pytest.approx(KL_QP, abs=1e-6)
    # sampled estimate: y=0 -> ln(0.9/0.5) = 0.5877867, y=1 -> ln(0.1/0.5) = -1.6094379;
    # weighted by the STUDENT's probabilities it gives KL(p||q) (not KL(q||p))
    e0 = sampled_kl_estimate(s, t, torch.tensor([[0]])).item()
    e1 = sampled_kl_estimate(s, t, torch.tensor([[1]])).item()
    assert e0 == pytest.approx(0.5877867, abs=1e-6) and e1 == pytest.approx(-1.6094379, abs=1e-6)
    assert 0.9 * e0 + 0.1 * e1 == pytest.approx(KL_PQ, abs=1e-6)
    # cross-entropy of the student on token 1 = -ln 0.1
    assert cross_entropy(s, torch.tensor([[1]])).item() == pytest.approx(2.3025851, abs=1e-6)


# ------------------------------------------------------------------------------------------------------
# gradients (float64 gradcheck on smooth inputs)
# ------------------------------------------------------------------------------------------------------
def test_gradcheck_all_estimators():
    s, t = rand_inputs(shape=(2, 2, 5), seed=11, scale=1.0)
    tok = torch.tensor([[0, 4], [2, 1]])
    ids = torch.tensor([[[0, 3, 1], [4, 2, 0]], [[1, 2, 3], [0, 4, 2]]])
    fns = [
        lambda x: kl_student_teacher_full(x, t),
        lambda x: kl_teacher_student_full(x, t),
        lambda x: kl_student_teacher_topk(x, t, k=3),
        lambda x: kl_student_teacher_topk_gathered(x, ids, t.gather(-1, ids)),
        # (the sampled surrogate is excluded on purpose: its gradient is NOT the derivative of its value)
        lambda x: generalized_jsd(x, t, beta=0.3),
        lambda x: cross_entropy(x, tok),
    ]
    for fn in fns:
        assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(True),), fast_mode=True)


def test_teacher_gets_no_gradient():
    s, t = rand_inputs(seed=12)
    t = t.clone().requires_grad_(True)
    s.requires_grad_(True)
    for out in (kl_student_teacher_full(s, t), kl_teacher_student_full(s, t), generalized_jsd(s, t, 0.5),
                kl_student_teacher_topk(s, t, 3), kl_student_teacher_sampled(s, t, torch.zeros(2, 3, dtype=torch.long))):
        (gt,) = torch.autograd.grad(out.sum(), t, allow_unused=True)
        assert gt is None


# ------------------------------------------------------------------------------------------------------
# masked_token_mean and gradient accumulation
# ------------------------------------------------------------------------------------------------------
def _toy_batch():
    g = torch.Generator().manual_seed(13)
    B, T, H, V = 8, 6, 4, 5
    feats = torch.randn(B, T, H, generator=g)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2, -1)
    prompt = [1, 2, 1, 1, 2, 1, 1, 2]
    resp = [1, 4, 2, 5, 1, 3, 5, 2]  # uneven response lengths
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt, resp)):
        mask[i, p:p + r] = True
    W = torch.randn(H, V, generator=g)
    return feats, teacher, mask, W


def test_masked_token_mean_gradient_accumulation_equals_full_batch():
    feats, teacher, mask, W0 = _toy_batch()
    n_total = int(mask.sum())

    W = W0.clone().requires_grad_(True)
    full = masked_token_mean(kl_student_teacher_full(feats @ W, teacher), mask, num_tokens=n_total)
    full.backward()
    g_full = W.grad.clone()

    W = W0.clone().requires_grad_(True)
    acc, naive = 0.0, []
    for i in range(0, 8, 2):
        sl = slice(i, i + 2)
        per_tok = kl_student_teacher_full(feats[sl] @ W, teacher[sl])
        mb = masked_token_mean(per_tok, mask[sl], num_tokens=n_total)
        mb.backward()
        acc += mb.item()
        naive.append(masked_token_mean(per_tok.detach(), mask[sl]).item())
    torch.testing.assert_close(torch.tensor(acc), full.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(W.grad, g_full, atol=1e-6, rtol=1e-6)
    # default num_tokens is mask.sum(): the full-batch default equals the explicit total
    assert masked_token_mean(kl_student_teacher_full(feats @ W0, teacher), mask).item() == pytest.approx(full.item(), abs=1e-7)
    # the naive mean of per-micro-batch means is biased on uneven lengths
    assert abs(float(np.mean(naive)) - full.item()) > 1e-3


def test_masked_token_mean_weights_and_zero_tokens():
    x = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 4.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    out = masked_token_mean(x, mask)
    assert out.item() == pytest.approx(7.0 / 3)
    out.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 0.0]]))
    for n in (0, 0.0, torch.tensor(0), None):
        y = torch.tensor([[float("nan"), float("-inf")]], requires_grad=True)
        z = masked_token_mean(y, torch.zeros(1, 2, dtype=torch.bool), num_tokens=n)
        assert z.item() == 0.0 and z.requires_grad
        z.backward()
        assert torch.all(y.grad == 0)
    # tensor num_tokens > 0
    assert masked_token_mean(x.detach(), mask, num_tokens=torch.tensor(7.0)).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------
# -inf / nan / padding robustness
# ------------------------------------------------------------------------------------------------------
ALL_PER_TOKEN = {
    "rev": lambda s, t, y: kl_student_teacher_full(s, t),
    "fwd": lambda s, t, y: kl_teacher_student_full(s, t),
    "topk": lambda s, t, y: kl_student_teacher_topk(s, t, k=3),
    "topk_allV": lambda s, t, y: kl_student_teacher_topk(s, t, k=16),
    "gathered": lambda s, t, y: kl_student_teacher_topk_gathered(
        s, torch.stack([y, (y + 1) % 6, torch.full_like(y, -1)], -1),
        t.gather(-1, torch.stack([y, (y + 1) % 6, torch.zeros_like(y)], -1))),
    "sampled": lambda s, t, y: kl_student_teacher_sampled(s, t, y),
    "jsd0": lambda s, t, y: generalized_jsd(s, t, 0.0),
    "jsd.5": lambda s, t, y: generalized_jsd(s, t, 0.5),
    "jsd1": lambda s, t, y: generalized_jsd(s, t, 1.0),
    "ce": lambda s, t, y: cross_entropy(s, y),
    "bridge_fwd": lambda s, t, y: kl_teacher_student_full(s, geometric_bridge_target(t, s, 0.5)),
}


def _nasty_batch():
    ninf, nan = float("-inf"), float("nan")
    s = torch.tensor([
        [[2.0, 1.0, ninf, 0.5, ninf, -1.0],    # student -inf entries
         [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],       # teacher -inf where student has mass
         [ninf] * 6],                          # padding row (masked)
        [[0.3, -0.2, 1.5, 0.0, 2.0, ninf],     # teacher masks a token the student likes
         [nan, float("inf"), 1.0, ninf, 0.0, nan],  # garbage (masked)
         [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]],      # prompt (masked)
    ])
    t = torch.log_softmax(torch.tensor([
        [[1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 6],
        [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [1.0] * 6, [0.0] * 6]]), -1)
    t[0, 1, 0] = ninf           # student has 1/6 mass there
    t[0, 2, :] = ninf           # padding row
    t[1, 0, 4] = ninf           # student's argmax is impossible for the teacher
    t[1, 1, 2] = nan
    tok = torch.tensor([[0, 0, 0], [4, 2, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    return s, t, tok, mask


@pytest.mark.parametrize("name", list(ALL_PER_TOKEN))
def test_nonfinite_inputs_give_finite_values_and_gradients(name):
    s, t, tok, mask = _nasty_batch()
    s = s.requires_grad_(True)
    per = ALL_PER_TOKEN[name](s, t, tok)
    assert per.shape == (2, 3) and torch.isfinite(per).all(), per
    loss = masked_token_mean(per, mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert torch.all(s.grad[~mask] == 0)                       # masked positions: exactly zero gradient
    assert torch.all(s.grad[0, 0][[2, 4]] == 0)                # -inf student logits get no gradient


def test_nonfinite_values_are_correct():
    s, t, tok, mask = _nasty_batch()
    sn, tn = s.double().numpy(), t.double().numpy()
    # 0 * log 0 = 0 for student -inf entries: equal to the numpy KL with those terms dropped
    ref = np_kl(np_log_softmax(sn[0, 0]), tn[0, 0])
    assert kl_student_teacher_full(s, t)[0, 0].item() == pytest.approx(ref, abs=1e-5)
    # teacher -inf where the student has mass 1/6: the floor replaces log 0
    # (the teacher is renormalised over its remaining 5 tokens: log(1/5) there)
    lt = np.array([LOGPROB_FLOOR] + [math.log(1 / 5)] * 5)
    ref = np.sum(np.full(6, 1 / 6) * (np.log(1 / 6) - lt))
    got = kl_student_teacher_full(s, t)[0, 1].item()
    assert got == pytest.approx(ref, rel=1e-5) and got > 100
    # forward KL: teacher -inf tokens contribute 0; student -inf tokens with teacher mass hit the floor
    assert kl_teacher_student_full(s, t)[0, 1].item() == pytest.approx(math.log(6 / 5), abs=1e-5)
    lps = np_log_softmax(sn[0, 0]).copy()
    lps[[2, 4]] = LOGPROB_FLOOR
    assert kl_teacher_student_full(s, t)[0, 0].item() == pytest.approx(np_kl(tn[0, 0], lps), rel=1e-5)
    # correct-sign gradient: pushing mass off the teacher-impossible token lowers the loss
    s2 = s.clone().requires_grad_(True)
    kl_student_teacher_full(s2, t)[1, 0].backward()
    assert s2.grad[1, 0, 4] > 1.0 and s2.grad[1, 0, 4] == s2.grad[1, 0].max()


# ------------------------------------------------------------------------------------------------------
# geometric bridge
# ------------------------------------------------------------------------------------------------------
def test_geometric_bridge_target():
    s, t = rand_inputs(seed=14)
    s = s.requires_grad_(True)
    q1 = geometric_bridge_target(t, s, 1.0)
    q0 = geometric_bridge_target(t, s, 0.0)
    torch.testing.assert_close(q1.exp(), t.exp())
    torch.testing.assert_close(q0.exp(), torch.softmax(s.detach(), -1))
    assert not q1.requires_grad and not q0.requires_grad  # student is detached
    qh = geometric_bridge_target(t, s, 0.3)
    assert not qh.requires_grad
    ref = 0.3 * t.numpy() + 0.7 * np_log_softmax(s.detach().numpy())
    np.testing.assert_allclose(qh.numpy(), np_log_softmax(ref), atol=1e-10)
    # per-position b [B, T] and full broadcastable b [B, T, 1] agree, and endpoints per position
    b = torch.tensor([[0.0, 0.3, 1.0], [1.0, 0.3, 0.0]], dtype=torch.float64)
    qb = geometric_bridge_target(t, s, b)
    torch.testing.assert_close(qb, geometric_bridge_target(t, s, b[..., None]))
    torch.testing.assert_close(qb[0, 1], qh[0, 1])
    torch.testing.assert_close(qb[0, 2].exp(), t[0, 2].exp())
    torch.testing.assert_close(qb[1, 2].exp(), torch.softmax(s.detach()[1, 2], -1))
    # as a target for a KL, gradient flows only through the explicit student argument
    s2 = s.detach().clone().requires_grad_(True)
    out = kl_student_teacher_full(s2, geometric_bridge_target(t, s2, 0.5)).sum()
    (g,) = torch.autograd.grad(out, s2)
    s3 = s.detach().clone().requires_grad_(True)
    (g3,) = torch.autograd.grad(kl_student_teacher_full(s3, geometric_bridge_target(t, s.detach(), 0.5)).sum(), s3)
    torch.testing.assert_close(g, g3)


# ------------------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------------------
def test_bf16_inputs_give_float32():
    s, t = rand_inputs(seed=15, dtype=torch.bfloat16)
    s = s.requires_grad_(True)
    tok = torch.tensor([[0, 1, 2], [3, 4, 5]])
    outs = [
        kl_student_teacher_full(s, t), kl_teacher_student_full(s, t), kl_student_teacher_topk(s, t, 3),
        kl_student_teacher_topk_gathered(s, tok[..., None], t.gather(-1, tok[..., None])),
        kl_student_teacher_sampled(s, t, tok), sampled_kl_estimate(s, t, tok),
        generalized_jsd(s, t, 0.5), generalized_jsd(s, t, 0.0), cross_entropy(s, tok),
        geometric_bridge_target(t, s, 0.5),
        masked_token_mean(kl_student_teacher_full(s, t), torch.ones(2, 3)),
    ]
    for o in outs:
        assert o.dtype == torch.float32 and torch.isfinite(o).all()
    ref = kl_student_teacher_full(s.detach().float(), t.float())
    torch.testing.assert_close(outs[0], ref)
    outs[0].sum().backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def test_shape_mismatch_raises():
    s, t = rand_inputs()
    with pytest.raises(ValueError, match=r"student_logits \(2, 3, 7\) and teacher \(2, 3, 5\) must have the same shape"):
        kl_student_teacher_full(s, t[..., :5])
    with pytest.raises(ValueError, match=r"tokens \(2, 4\) must equal student_logits.shape\[:-1\] \(2, 3\)"):
        kl_student_teacher_sampled(s, t, torch.zeros(2, 4, dtype=torch.long))
    assert L.LOGPROB_FLOOR == LOGPROB_FLOOR < -100
