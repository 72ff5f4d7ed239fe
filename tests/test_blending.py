"""Tests for trb_exp.blending (the TRB behaviour-policy solver).

The reference used here is written independently of the module: plain float64 numpy, KL(mu_b || pi_S)
computed directly from its definition on the joint support, and a dense bisection on b to 1e-12.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trb_exp.blending import (
    BlendResult,
    geometric_mixture,
    kl_behavior_student,
    kl_divergence,
    kl_teacher_student,
    safe_log_softmax,
    trust_region_blend,
)

NINF = float("-inf")


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ------------------------------------------------------------------------------------------------
# independent float64 reference
# ------------------------------------------------------------------------------------------------


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    mx = np.max(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x - mx - np.log(np.sum(np.exp(x - mx), axis=-1, keepdims=True))


def np_kl_path(ls: np.ndarray, lt: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KL(mu_b || pi_S) per row, mu_b ~ pi_S^(1-b) pi_T^b, straight from the definition (float64)."""
    ls = np.asarray(ls, np.float64)
    lt = np.asarray(lt, np.float64)
    b = np.broadcast_to(np.asarray(b, np.float64), ls.shape[:-1])
    out = np.zeros(ls.shape[:-1])
    fs, ft = np.isfinite(ls), np.isfinite(lt)
    for i in np.ndindex(*ls.shape[:-1]):
        bi = float(b[i])
        if bi == 0.0:
            out[i] = 0.0
            continue
        if bi == 1.0:
            if np.any(ft[i] & ~fs[i]):
                out[i] = np.inf
                continue
            pt = np.exp(lt[i][ft[i]])
            out[i] = float(np.sum(pt * (lt[i][ft[i]] - ls[i][ft[i]])))
            continue
        j = fs[i] & ft[i]
        if not j.any():
            out[i] = np.inf
            continue
        z = (1.0 - bi) * ls[i][j] + bi * lt[i][j]
        zm = z.max()
        lmu = z - zm - np.log(np.sum(np.exp(z - zm)))
        out[i] = float(np.sum(np.exp(lmu) * (lmu - ls[i][j])))
    return out


def np_kl_path_batched(ls: np.ndarray, lt: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Vectorised version for 0 < b < 1 (rows of equal width), same formula as np_kl_path."""
    j = np.isfinite(ls) & np.isfinite(lt)
    with np.errstate(invalid="ignore"):
        z = np.where(j, (1.0 - b[:, None]) * np.where(j, ls, 0.0) + b[:, None] * np.where(j, lt, 0.0), -np.inf)
    zm = z.max(axis=-1, keepdims=True)
    lmu = z - zm - np.log(np.sum(np.exp(z - zm), axis=-1, keepdims=True))
    mu = np.exp(lmu)
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(j, mu * (lmu - np.where(j, ls, 0.0)), 0.0), axis=-1)


def np_ref_beta(ls: np.ndarray, lt: np.ndarray, eps: np.ndarray, n_bisect: int = 42) -> np.ndarray:
    """Largest feasible b (sup if not attained) by dense bisection on (0, 1) to ~2e-13."""
    n = ls.shape[0]
    eps = np.broadcast_to(np.asarray(eps, np.float64), (n,))
    k1 = np_kl_path(ls, lt, np.ones(n))
    j = np.isfinite(ls) & np.isfinite(lt)
    p_joint = np.sum(np.where(j, np.exp(np.where(j, ls, -np.inf)), 0.0), axis=-1)
    with np.errstate(divide="ignore"):
        jump0 = -np.log(p_joint)
    lo, hi = np.zeros(n), np.ones(n)
    for _ in range(n_bisect):
        mid = 0.5 * (lo + hi)
        k = np.where(j.any(-1), np_kl_path_batched(ls, lt, mid), np.inf)
        ok = k <= eps
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    beta = lo
    beta = np.where(jump0 >= eps, 0.0, beta)
    beta = np.where(k1 <= eps, 1.0, beta)
    beta = np.where(eps == 0.0, np.where(np.all(ls == lt, axis=-1), 1.0, 0.0), beta)
    return beta


def make_rows(gen: torch.Generator, n: int, V: int, masks: bool = False):
    """Student/teacher logit rows in a mix of regimes, plus per-row eps over 1e-4 .. 5 (log-uniform)."""
    scale = torch.exp(torch.empty(n, 1).uniform_(-2.0, 2.5, generator=gen))  # ~0.14 .. 12
    xs = torch.randn(n, V, generator=gen) * scale
    kind = torch.randint(0, 4, (n, 1), generator=gen)
    corr = torch.rand(n, 1, generator=gen) * 1.5
    noise = torch.randn(n, V, generator=gen) * scale * torch.rand(n, 1, generator=gen)
    t_corr = xs * corr + noise  # correlated teacher
    bump = torch.zeros(n, V)
    bump[torch.arange(n), torch.randint(0, V, (n,), generator=gen)] = torch.empty(n).uniform_(2, 15, generator=gen)
    t_sharp = xs + bump  # sharp teacher: one token boosted
    t_flat = torch.randn(n, V, generator=gen) * 0.1  # nearly uniform teacher
    temp = torch.exp(torch.empty(n, 1).uniform_(-1.5, 1.5, generator=gen))
    t_temp = xs / temp  # same ranking, other temperature
    xt = torch.where(kind == 0, t_corr, torch.where(kind == 1, t_sharp, torch.where(kind == 2, t_flat, t_temp)))
    if masks:
        rate = torch.rand(n, 2, generator=gen) * 0.2 * (torch.rand(n, 2, generator=gen) < 0.6)
        ms = torch.rand(n, V, generator=gen) < rate[:, :1]  # ~40% of rows unmasked in each model
        mt = torch.rand(n, V, generator=gen) < rate[:, 1:]
        ms[:, 0] = False  # keep a non-empty joint support
        mt[:, 0] = False
        xs = xs.masked_fill(ms, NINF)
        xt = xt.masked_fill(mt, NINF)
    eps = torch.exp(torch.empty(n).uniform_(math.log(1e-4), math.log(5.0), generator=gen))
    return xs, xt, eps


# ------------------------------------------------------------------------------------------------
# accuracy against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "V,n,masks",
    [(3, 2500, False), (5, 1500, True), (17, 2000, False), (64, 1500, True), (256, 1500, False), (1000, 1200, False)],
)
def test_matches_float64_bisection_reference(V, n, masks):
    gen = torch.Generator().manual_seed(1000 + V)
    xs, xt, eps = make_rows(gen, n, V, masks)
    res = trust_region_blend(xs, xt, eps)
    assert isinstance(res, BlendResult)
    beta = res.beta.double().numpy()
    kl = res.kl.double().numpy()
    e = eps.double().numpy()
    ls, lt = np_log_softmax(xs.double().numpy()), np_log_softmax(xt.double().numpy())
    ref = np_ref_beta(ls, lt, e)

    for name, out in [("logprobs", res.logprobs), ("beta", res.beta), ("kl", res.kl)]:
        assert not torch.isnan(out).any(), name
    # feasibility of the returned kl
    assert np.all(kl <= e + 1e-6), np.max(kl - e)
    # the returned kl is the true KL(mu_beta || pi_S) at the returned beta
    kl_at_beta = np_kl_path(ls, lt, beta)
    fin = np.isfinite(kl_at_beta)
    assert np.all(np.abs(kl_at_beta[fin] - kl[fin]) <= 1e-6 + 1e-5 * kl[fin])
    # beta within 1e-5 of the reference root, or (flat K: beta ill-conditioned) the true KL within tolerance
    close = np.abs(beta - ref) <= 1e-5
    kl_ok = (kl_at_beta <= e * (1 + 1e-5) + 1e-6) & (kl_at_beta >= e * (1 - 1e-3))
    assert np.all(close | kl_ok), np.flatnonzero(~(close | kl_ok))[:10]
    assert close.mean() > 0.99
    # the trust region is used up whenever the solver stops short of the teacher
    inner = (beta > 0) & (beta < 1) & (ref < 1 - 1e-6)
    assert np.all(kl[inner] >= e[inner] * (1 - 1e-3)), np.min(kl[inner] / e[inner])
    # sanity on the mix: most rows are proper interior solves
    assert inner.mean() > (0.2 if masks else 0.3)
    if masks:  # every -inf case occurs: beta = 0 by the jump at 0+, near-one rows, teacher-only masks
        assert np.any((beta == 0) & (ref == 0)) and np.any((beta > 1 - 1e-6) & (beta < 1))


@pytest.mark.parametrize("eps", [1e-7, 1e-6])
def test_tiny_eps_float32_accuracy(eps):
    gen = torch.Generator().manual_seed(8)
    xs, xt, _ = make_rows(gen, 600, 200)
    res = trust_region_blend(xs, xt, eps)
    ls, lt = np_log_softmax(xs.double().numpy()), np_log_softmax(xt.double().numpy())
    beta = res.beta.double().numpy()
    ref = np_ref_beta(ls, lt, np.full(600, eps))
    assert np.max(np.abs(beta - ref)) < 1e-5
    true_kl = np_kl_path(ls, lt, beta)
    inner = (beta > 0) & (beta < 1)
    assert inner.mean() > 0.9
    assert np.all(true_kl[inner] <= eps * (1 + 1e-4)) and np.all(true_kl[inner] >= eps * (1 - 1e-3))


def test_float64_compute_dtype_is_tighter():
    gen = torch.Generator().manual_seed(7)
    xs, xt, eps = make_rows(gen, 400, 50)
    res = trust_region_blend(xs.double(), xt.double(), eps.double(), dtype=torch.float64, tol=1e-9)
    assert res.logprobs.dtype == res.beta.dtype == res.kl.dtype == torch.float64
    ls, lt = np_log_softmax(xs.double().numpy()), np_log_softmax(xt.double().numpy())
    ref = np_ref_beta(ls, lt, eps.double().numpy())
    assert np.max(np.abs(res.beta.numpy() - ref)) < 1e-7
    assert np.all(res.kl.numpy() <= eps.double().numpy() + 1e-12)


# ------------------------------------------------------------------------------------------------
# optimality: mu_b is the I-projection  argmin_q KL(q || pi_T)  s.t.  KL(q || pi_S) <= eps
# ------------------------------------------------------------------------------------------------


def test_geometric_mixture_solves_trust_region_problem_slsqp():
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    gen = torch.Generator().manual_seed(3)
    checked = 0
    for trial in range(40):
        V = int(rng.integers(3, 6))
        xs = torch.randn(1, V, generator=gen, dtype=torch.float64) * 1.5
        xt = torch.randn(1, V, generator=gen, dtype=torch.float64) * 1.5
        ls, lt = np_log_softmax(xs.numpy())[0], np_log_softmax(xt.numpy())[0]
        k1 = float(np.sum(np.exp(lt) * (lt - ls)))
        eps = float(k1 * rng.uniform(0.05, 0.8))
        res = trust_region_blend(xs, xt, eps, dtype=torch.float64, tol=1e-10)
        b = float(res.beta)
        assert 0 < b < 1
        mu = np.exp(res.logprobs.numpy()[0])

        def obj(q):
            q = np.clip(q, 1e-300, None)
            return float(np.sum(q * (np.log(q) - lt)))

        def obj_grad(q):
            return np.log(np.clip(q, 1e-300, None)) - lt + 1.0

        def cons(q):
            q = np.clip(q, 1e-300, None)
            return eps - float(np.sum(q * (np.log(q) - ls)))

        def cons_grad(q):
            return -(np.log(np.clip(q, 1e-300, None)) - ls + 1.0)

        starts = [np.exp(ls), np.full(V, 1.0 / V)] + [rng.dirichlet(np.ones(V)) for _ in range(3)]
        best = None
        for x0 in starts:
            sol = minimize(
                obj,
                x0,
                jac=obj_grad,
                method="SLSQP",
                bounds=[(1e-12, 1.0)] * V,
                constraints=[
                    {"type": "eq", "fun": lambda q: np.sum(q) - 1.0, "jac": lambda q: np.ones_like(q)},
                    {"type": "ineq", "fun": cons, "jac": cons_grad},
                ],
                options={"ftol": 1e-14, "maxiter": 1000},
            )
            if sol.success and cons(sol.x) >= -1e-8 and abs(sol.x.sum() - 1) < 1e-8:
                if best is None or sol.fun < best.fun:
                    best = sol
        assert best is not None
        q = best.x / best.x.sum()
        tv = 0.5 * np.abs(q - mu).sum()
        assert tv < 1e-3, (trial, tv)
        # mu is feasible and no feasible point found by SLSQP beats it
        assert cons(mu) >= -1e-9
        assert best.fun >= obj(mu) - 1e-7, (best.fun, obj(mu))
        checked += 1
    assert checked == 40


# ------------------------------------------------------------------------------------------------
# exact cases
# ------------------------------------------------------------------------------------------------


def test_eps_zero_returns_student():
    gen = torch.Generator().manual_seed(11)
    xs, xt, _ = make_rows(gen, 64, 30)
    res = trust_region_blend(xs, xt, 0.0)
    assert torch.all(res.beta == 0)
    assert torch.all(res.kl == 0)
    assert torch.all(res.iters == 0)
    assert torch.equal(res.logprobs, torch.log_softmax(xs, -1))


def test_teacher_inside_trust_region_returns_teacher():
    gen = torch.Generator().manual_seed(12)
    xs = torch.randn(32, 40, generator=gen)
    xt = xs + 0.3 * torch.randn(32, 40, generator=gen)
    k = kl_teacher_student(torch.log_softmax(xt, -1), torch.log_softmax(xs, -1))
    res = trust_region_blend(xs, xt, k * 1.01 + 1e-7)
    assert torch.all(res.beta == 1)
    assert torch.all(res.iters == 0)
    assert torch.equal(res.logprobs, torch.log_softmax(xt, -1))
    torch.testing.assert_close(res.kl, k, rtol=1e-5, atol=1e-7)
    # infinite radius always gives the teacher
    res = trust_region_blend(xs, xt, float("inf"))
    assert torch.all(res.beta == 1)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 1.0])
def test_identical_distributions(eps):
    x = torch.randn(5, 100, generator=torch.Generator().manual_seed(13)) * 4
    x[1, :10] = NINF  # identical masks too
    res = trust_region_blend(x, x.clone(), eps)
    assert torch.all(res.beta == 1)
    assert torch.all(res.kl == 0)
    assert torch.all(res.iters == 0)
    assert torch.equal(res.logprobs, torch.log_softmax(x, -1))


# ------------------------------------------------------------------------------------------------
# structural properties
# ------------------------------------------------------------------------------------------------


def test_monotone_in_eps():
    gen = torch.Generator().manual_seed(14)
    xs, xt, _ = make_rows(gen, 200, 64)
    eps_grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
    prev_b = prev_k = None
    for e in eps_grid:
        r = trust_region_blend(xs, xt, e)
        if prev_b is not None:
            assert torch.all(r.beta >= prev_b - 1e-6)
            assert torch.all(r.kl >= prev_k - 1e-7)
        prev_b, prev_k = r.beta, r.kl


def test_bf16_inputs_computed_in_float32():
    gen = torch.Generator().manual_seed(15)
    xs, xt, eps = make_rows(gen, 300, 128)
    xs16, xt16 = xs.bfloat16(), xt.bfloat16()
    r16 = trust_region_blend(xs16, xt16, eps)
    r32 = trust_region_blend(xs16.float(), xt16.float(), eps)
    assert r16.logprobs.dtype == r16.beta.dtype == r16.kl.dtype == torch.float32
    assert torch.equal(r16.beta, r32.beta) and torch.equal(r16.logprobs, r32.logprobs)
    assert torch.all(r16.kl <= eps + 1e-6)
    ls, lt = np_log_softmax(xs16.double().numpy()), np_log_softmax(xt16.double().numpy())
    ref = np_ref_beta(ls, lt, eps.double().numpy())
    assert np.mean(np.abs(r16.beta.double().numpy() - ref) <= 1e-5) > 0.99


def test_eps_tensor_per_row_matches_scalar_calls():
    gen = torch.Generator().manual_seed(16)
    xs, xt, eps = make_rows(gen, 12, 33)
    batched = trust_region_blend(xs, xt, eps)
    for i in range(12):
        single = trust_region_blend(xs[i], xt[i], float(eps[i]))
        assert single.beta.shape == ()
        torch.testing.assert_close(single.beta, batched.beta[i], rtol=0, atol=1e-7)
        torch.testing.assert_close(single.logprobs, batched.logprobs[i], rtol=1e-6, atol=1e-6)


def test_batch_shapes_and_broadcast_eps():
    gen = torch.Generator().manual_seed(17)
    B, T, V = 3, 5, 20
    xs = torch.randn(B, T, V, generator=gen) * 2
    xt = torch.randn(B, T, V, generator=gen) * 2
    eps = torch.tensor([0.01, 0.1, 1.0]).unsqueeze(-1)  # [B, 1] broadcast over T
    r3 = trust_region_blend(xs, xt, eps)
    assert r3.logprobs.shape == (B, T, V)
    assert r3.beta.shape == r3.kl.shape == r3.iters.shape == (B, T)
    assert r3.iters.dtype == torch.int64
    r2 = trust_region_blend(xs.reshape(B * T, V), xt.reshape(B * T, V), eps.expand(B, T).reshape(-1))
    torch.testing.assert_close(r3.beta.reshape(-1), r2.beta, rtol=0, atol=1e-7)
    torch.testing.assert_close(r3.logprobs.reshape(B * T, V), r2.logprobs, rtol=1e-6, atol=1e-6)
    r1 = trust_region_blend(xs[0, 0], xt[0, 0], 0.01)
    assert r1.logprobs.shape == (V,) and r1.beta.shape == ()
    # [B] eps against [B, T, V] logits is not broadcastable (batch shape is [B, T])
    with pytest.raises(ValueError, match="eps"):
        trust_region_blend(xs, xt, torch.tensor([0.1, 0.2, 0.3, 0.4]))


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), torch.tensor([0.1, -0.2])])
def test_negative_eps_raises(bad):
    xs = torch.randn(2, 10)
    with pytest.raises(ValueError, match="eps"):
        trust_region_blend(xs, xs + 1, bad)


def test_result_kl_consistent_with_helper():
    gen = torch.Generator().manual_seed(18)
    xs, xt, eps = make_rows(gen, 200, 80)
    r = trust_region_blend(xs, xt, eps, dtype=torch.float64)
    k = kl_behavior_student(r.logprobs, safe_log_softmax(xs, torch.float64))
    torch.testing.assert_close(r.kl, k, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(r.logprobs.exp().sum(-1), torch.ones(200, dtype=torch.float64))
    torch.testing.assert_close(
        r.logprobs, geometric_mixture(safe_log_softmax(xs, torch.float64), safe_log_softmax(xt, torch.float64), r.beta)
    )


def test_max_iter_cap_stays_feasible():
    gen = torch.Generator().manual_seed(19)
    xs, xt, eps = make_rows(gen, 300, 40)
    for m in (0, 1, 2):
        r = trust_region_blend(xs, xt, eps, max_iter=m)
        assert torch.all(r.kl <= eps + 1e-6)
        assert torch.all(r.iters <= m)


def test_iteration_count_vs_bisection():
    gen = torch.Generator().manual_seed(20)
    xs, xt, eps = make_rows(gen, 3000, 100)
    tol = 1e-6
    r = trust_region_blend(xs, xt, eps, tol=tol)
    solved = r.iters > 0
    assert solved.float().mean() > 0.5
    it = r.iters[solved].double()
    bisection_iters = math.ceil(math.log2(1.0 / tol))  # bracket [0, 1] down to width tol: 20 evaluations
    assert it.mean() <= 8, it.mean()
    assert it.mean() < 0.4 * bisection_iters
    assert it.max() <= 30


# ------------------------------------------------------------------------------------------------
# -inf, extreme values, large vocab
# ------------------------------------------------------------------------------------------------


def _assert_clean(r: BlendResult, eps, norm_atol: float = 1e-5):
    for name, t in r._asdict().items():
        assert not torch.isnan(t.double()).any(), name
    assert torch.all(r.kl <= torch.as_tensor(eps, dtype=r.kl.dtype) + 1e-6)
    lse = torch.logsumexp(r.logprobs.double(), -1)
    torch.testing.assert_close(lse, torch.zeros_like(lse), rtol=0, atol=norm_atol)


def test_student_masked_tokens():
    gen = torch.Generator().manual_seed(21)
    V = 50
    xs = torch.randn(8, V, generator=gen) * 2
    xt = torch.randn(8, V, generator=gen) * 2
    mask = torch.zeros(8, V, dtype=torch.bool)
    mask[:, :5] = True
    xs = xs.masked_fill(mask, NINF)  # pi_S = 0 < pi_T there: b = 1 infeasible
    for eps in (1e-3, 0.1, 1.0):
        r = trust_region_blend(xs, xt, eps)
        _assert_clean(r, eps)
        assert torch.all(r.beta < 1)
        assert torch.all(torch.isneginf(r.logprobs[mask]))
        ls, lt = np_log_softmax(xs.double().numpy()), np_log_softmax(xt.double().numpy())
        ref = np_ref_beta(ls, lt, np.full(8, eps))
        np.testing.assert_allclose(r.beta.double().numpy(), ref, atol=1e-5)
        assert torch.all(r.kl >= eps * (1 - 1e-3))
    # limit case: even lim_{b->1} KL fits: sup not attained, beta = nextafter(1, 0), mu ~ pi_T on supp pi_S
    r = trust_region_blend(xs, xt, 1e3)
    _assert_clean(r, 1e3)
    assert torch.all(r.beta == torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))
    assert torch.all(torch.isneginf(r.logprobs[mask]))
    lt_on_s = torch.log_softmax(xt.masked_fill(mask, NINF), -1)
    torch.testing.assert_close(r.logprobs[~mask], lt_on_s[~mask], rtol=1e-4, atol=1e-4)


def test_teacher_masked_tokens_jump_at_zero():
    gen = torch.Generator().manual_seed(22)
    V = 40
    xs = torch.randn(6, V, generator=gen)
    xt = torch.randn(6, V, generator=gen)
    mask = torch.zeros(6, V, dtype=torch.bool)
    mask[:, -8:] = True
    xt = xt.masked_fill(mask, NINF)  # pi_T = 0 < pi_S: mu_b drops these for every b > 0
    ls = torch.log_softmax(xs.double(), -1)
    jump0 = -torch.log(ls[~mask].reshape(6, -1).exp().sum(-1))  # -log pi_S(supp pi_T)
    # below the jump: beta = 0, mu = pi_S (full support)
    r = trust_region_blend(xs, xt, (jump0 * 0.9).float())
    assert torch.all(r.beta == 0) and torch.all(r.kl == 0) and torch.all(r.iters == 0)
    assert torch.equal(r.logprobs, torch.log_softmax(xs, -1))
    # above the jump: beta > 0, kl >= jump0, masked tokens have zero mass
    eps = (jump0 + 0.05).float()
    r = trust_region_blend(xs, xt, eps)
    _assert_clean(r, eps)
    assert torch.all(r.beta > 0) and torch.all(r.beta < 1)
    assert torch.all(r.kl.double() >= jump0 - 1e-6)
    assert torch.all(r.kl >= eps * (1 - 1e-3))
    assert torch.all(torch.isneginf(r.logprobs[mask]))
    ref = np_ref_beta(ls.numpy(), np_log_softmax(xt.double().numpy()), eps.double().numpy())
    np.testing.assert_allclose(r.beta.double().numpy(), ref, atol=1e-5)
    # teacher inside the radius: supp T within supp S so b = 1 is feasible
    k1 = kl_teacher_student(torch.log_softmax(xt, -1), torch.log_softmax(xs, -1))
    r = trust_region_blend(xs, xt, k1 + 1e-3)
    assert torch.all(r.beta == 1) and torch.all(torch.isneginf(r.logprobs[mask]))


def test_both_masked_equals_reduced_vocab():
    gen = torch.Generator().manual_seed(23)
    V, pad = 60, 12
    xs = torch.randn(10, V, generator=gen) * 2
    xt = torch.randn(10, V, generator=gen) * 2
    xs_p, xt_p = xs.clone(), xt.clone()
    xs_p[:, -pad:] = NINF
    xt_p[:, -pad:] = NINF
    eps = torch.linspace(1e-3, 1.0, 10)
    r_pad = trust_region_blend(xs_p, xt_p, eps)
    r_red = trust_region_blend(xs[:, :-pad], xt[:, :-pad], eps)
    torch.testing.assert_close(r_pad.beta, r_red.beta, rtol=0, atol=2e-6)
    torch.testing.assert_close(r_pad.logprobs[:, :-pad], r_red.logprobs, rtol=1e-5, atol=1e-5)
    assert torch.all(torch.isneginf(r_pad.logprobs[:, -pad:]))


def test_disjoint_supports_and_fully_masked_rows():
    xs = torch.tensor([[0.0, 1.0, NINF, NINF], [NINF] * 4, [0.0, 1.0, 2.0, 3.0]])
    xt = torch.tensor([[NINF, NINF, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0], [NINF] * 4])
    r = trust_region_blend(xs, xt, 0.1)
    _assert_clean(r, 0.1)
    assert r.beta[0] == 0 and r.kl[0] == 0  # disjoint supports
    assert torch.equal(r.logprobs[0], torch.log_softmax(xs[0], -1))
    # all -inf rows are treated as uniform (documented), so rows 1 and 2 are ordinary problems
    assert torch.all(torch.isfinite(r.logprobs[1:]))
    assert 0 < r.beta[1] < 1 and 0 < r.beta[2] < 1


def test_extreme_logits():
    gen = torch.Generator().manual_seed(24)
    V = 64
    sign_s = torch.randint(0, 2, (40, V), generator=gen) * 2 - 1
    sign_t = torch.randint(0, 2, (40, V), generator=gen) * 2 - 1
    xs = (sign_s * 1e4 * torch.rand(40, V, generator=gen)).float()
    xt = (sign_t * 1e4 * torch.rand(40, V, generator=gen)).float()
    xs[:10, :3] = 1e4
    xt[:10, 3:6] = 1e4
    xs[20:30, 7] = NINF
    for eps in (1e-4, 0.05, 1.0, 50.0):
        for dt in (torch.float32, torch.float64):
            r = trust_region_blend(xs, xt, eps, dtype=dt)
            _assert_clean(r, eps)
            assert torch.all((r.beta >= 0) & (r.beta <= 1))
            assert torch.all(torch.isneginf(r.logprobs[20:30, 7]) | (r.beta[20:30] == 1))
    r = trust_region_blend(xs.bfloat16(), -xs.bfloat16(), 0.1)
    _assert_clean(r, 0.1)


def test_large_vocab_row_with_mask_sampling_never_picks_masked():
    gen = torch.Generator().manual_seed(25)
    V = 151_936
    xs = torch.randn(2, V, generator=gen) * 3
    xt = xs * 0.5 + torch.randn(2, V, generator=gen) * 3
    mask_s = torch.rand(2, V, generator=gen) < 0.05
    mask_t = torch.rand(2, V, generator=gen) < 0.01  # jump at b = 0+ is -log(1 - ~1%) << eps
    xs = xs.masked_fill(mask_s, NINF).bfloat16()
    xt = xt.masked_fill(mask_t, NINF).bfloat16()
    eps = torch.tensor([0.3, 2.0])
    r = trust_region_blend(xs, xt, eps)
    _assert_clean(r, eps, norm_atol=1e-4)  # float32 log_softmax over 152k tokens is normalised to ~1e-5
    assert torch.all(r.beta > 0)
    zero = mask_s | mask_t  # 0 < beta < 1: mu lives on the joint support
    assert torch.all(torch.isneginf(r.logprobs[zero]))
    assert torch.all(r.kl >= eps * (1 - 1e-3))
    draws = torch.distributions.Categorical(logits=r.logprobs).sample((2000,))
    assert not zero.gather(1, draws.T).any()
    draws = torch.multinomial(r.logprobs.exp(), 2000, replacement=True)
    assert not zero.gather(1, draws).any()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def test_safe_log_softmax():
    x = torch.tensor(
        [[0.0, 1.0, 2.0], [NINF, NINF, NINF], [float("nan"), 0.0, 1.0], [float("inf"), 0.0, float("inf")]]
    )
    y = safe_log_softmax(x)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y[0], torch.log_softmax(x[0], -1))
    torch.testing.assert_close(y[1], torch.full((3,), -math.log(3.0)))  # fully masked -> uniform
    assert torch.isneginf(y[2, 0]) and torch.allclose(y[2, 1:], torch.log_softmax(x[2, 1:], -1))
    torch.testing.assert_close(y[3], torch.tensor([-math.log(2.0), NINF, -math.log(2.0)]))
    assert safe_log_softmax(x.bfloat16()).dtype == torch.float32
    assert safe_log_softmax(x, torch.float64).dtype == torch.float64


def test_geometric_mixture_helper():
    gen = torch.Generator().manual_seed(26)
    ls = torch.log_softmax(torch.randn(4, 6, generator=gen), -1)
    lt = torch.log_softmax(torch.randn(4, 6, generator=gen), -1)
    assert torch.equal(geometric_mixture(ls, lt, 0.0), ls)
    assert torch.equal(geometric_mixture(ls, lt, 1.0), lt)
    b = torch.tensor([0.0, 0.25, 0.5, 1.0])
    m = geometric_mixture(ls, lt, b)
    torch.testing.assert_close(m[1], torch.log_softmax(0.75 * ls[1] + 0.25 * lt[1], -1))
    assert torch.equal(m[0], ls[0]) and torch.equal(m[3], lt[3])
    # -inf handling
    ls2 = ls.clone()
    ls2[:, 0] = NINF
    lt2 = lt.clone()
    lt2[:, 1] = NINF
    m = geometric_mixture(ls2, lt2, 0.5)
    assert torch.all(torch.isneginf(m[:, :2])) and torch.all(torch.isfinite(m[:, 2:]))
    # inputs are renormalised; at beta = 1 the teacher is returned even where the student has no mass
    assert torch.equal(geometric_mixture(ls2, lt2, 1.0), torch.log_softmax(lt2, -1))
    disjoint_s = torch.tensor([[0.0, NINF]])
    disjoint_t = torch.tensor([[NINF, 0.0]])
    assert torch.equal(geometric_mixture(disjoint_s, disjoint_t, 0.5), disjoint_s)  # falls back to student
    assert not torch.isnan(m).any()


def test_kl_helpers():
    p = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))
    q = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5], [0.0, 0.5, 0.5]]))
    k = kl_divergence(p, q)
    assert not torch.isnan(k).any()
    torch.testing.assert_close(k[0], torch.tensor(math.log(2.0)))  # 0 log 0 = 0
    assert k[1] == 0
    assert torch.isposinf(k[2])  # p > 0 = q
    # both -inf on the same token: no NaN
    both = torch.tensor([[0.0, NINF]])
    assert kl_divergence(both, both)[0] == 0
    # a token with finite log p whose exp underflows still counts as support
    tiny = torch.tensor([[0.0, -200.0]])
    assert torch.isposinf(kl_divergence(tiny, both))[0]
    # agrees with the textbook formula on random full-support rows, float32 and float64
    gen = torch.Generator().manual_seed(27)
    for dt in (torch.float32, torch.float64):
        a = torch.log_softmax(torch.randn(50, 300, generator=gen, dtype=dt) * 2, -1)
        c = torch.log_softmax(torch.randn(50, 300, generator=gen, dtype=dt) * 2, -1)
        torch.testing.assert_close(kl_divergence(a, c), (a.exp() * (a - c)).sum(-1))
    assert torch.equal(kl_behavior_student(p, q), k)
    assert torch.equal(kl_teacher_student(p, q), k)
