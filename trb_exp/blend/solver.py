"""TRB's exact behaviour-policy solver (:func:`trust_region_blend`, see ``trb_exp.blending`` for the
derivation) and its bisection reference (:func:`trust_region_blend_bisection`)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from trb_exp.blend.kernel import _evaluate
from trb_exp.blend.ops import BlendResult, _check_float_dtype, _sanitize_logits


class _Prepared(NamedTuple):
    out: Tensor  # [N, V] output log-probs: log pi_S, or log pi_T on `one` rows; mixed rows written later
    beta: Tensor  # [N] beta of the exact cases (1 on `one` rows, else 0)
    kl: Tensor  # [N] kl of the exact cases
    eps: Tensor  # [N]
    batch_shape: torch.Size
    idx: Tensor  # [M] global ids of rows whose mu is a proper mixture (near-one | solve), ascending
    logq: Tensor  # [M, V] log q = log pi_S + jump0 on J, -inf elsewhere
    q: Tensor  # [M, V]
    dc: Tensor  # [M, V] d - E_q[d] on J (d from the logit difference), 0 elsewhere
    jump0: Tensor  # [M] -log pi_S(J)
    epsp: Tensor  # [M] eps - jump0 (> 0 on solve rows)
    kl1: Tensor  # [M] K(1-) = lim_{b->1} KL(mu_b || q)
    var0: Tensor  # [M] Var_q[d] = K''(0)
    is_solve: Tensor  # [M] bool; False: near-one row (beta = nextafter(1, 0))


def _as_eps(eps: Union[float, Tensor], batch_shape: torch.Size, dtype: torch.dtype, device) -> Tensor:
    e = torch.as_tensor(eps, dtype=dtype, device=device)
    bad = torch.isnan(e) | (e < 0)
    if bool(bad.any()):
        raise ValueError(f"eps must be >= 0 (the KL trust-region radius in nats), got eps={e[bad].flatten()[0].item()}")
    try:
        return torch.broadcast_to(e, batch_shape).reshape(-1)
    except RuntimeError as err:
        raise ValueError(
            f"eps of shape {tuple(e.shape)} is not broadcastable to the batch shape {tuple(batch_shape)}"
        ) from err



def _inputs(student_logits: Tensor, teacher_logits: Tensor, eps, dtype: torch.dtype):
    """Checked, broadcast, flattened [N, V] logits (sanitised) and their log-softmaxes, eps [N], the batch shape."""
    _check_float_dtype(dtype)
    if student_logits.dim() == 0 or teacher_logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher vocab sizes differ: {student_logits.shape[-1]} vs {teacher_logits.shape[-1]}"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError("the vocabulary (last) dimension must be non-empty")
    xs, xt = torch.broadcast_tensors(student_logits.to(dtype), teacher_logits.to(dtype))
    batch_shape = xs.shape[:-1]
    V = xs.shape[-1]
    xs = xs.reshape(-1, V)
    xt = xt.reshape(-1, V)
    eps_f = _as_eps(eps, batch_shape, dtype, xs.device)
    xs, ls = _sanitize_logits(xs)
    xt, lt = _sanitize_logits(xt)
    return xs, xt, ls, lt, eps_f, batch_shape


def _supports(ls: Tensor, lt: Tensor, dtype: torch.dtype):
    """Support bookkeeping with float reductions (amax/amin of lt - ls, NaN/inf sentinels) rather than bool
    masks, which are slow on CPU for vocab-sized tensors: (t_in_s, identical, logq, has_joint, jump0) per row,
    logq = log pi_S + jump0 on J, -inf elsewhere; jump0 = -log pi_S(J) (inf without a joint support)."""
    N, device, inf = ls.shape[0], ls.device, float("inf")
    # dl = lt - ls: +inf on teacher-only tokens, -inf on student-only tokens, NaN (-> 0) if masked in both
    dl = torch.sub(lt, ls).nan_to_num_(nan=0.0, posinf=inf, neginf=-inf)
    dl_max, dl_min = dl.amax(dim=-1), dl.amin(dim=-1)
    del dl
    t_in_s = dl_max < inf
    s_only = dl_min == -inf  # rows where pi_S has mass outside supp(pi_T): KL jumps at b = 0+
    identical = (dl_max == 0) & (dl_min == 0)

    # log q before the jump0 shift: log pi_S on J, -inf elsewhere (lt * 0 is NaN exactly where lt = -inf)
    if bool(torch.isneginf(lt.amin(dim=-1)).any()):
        logq = torch.mul(lt, 0.0).add_(ls).nan_to_num_(nan=-inf, posinf=inf, neginf=-inf)
    else:
        logq = ls.clone()
    has_joint = logq.amax(dim=-1) > -inf
    jump0_all = torch.zeros(N, dtype=dtype, device=device)
    r = (s_only & has_joint).nonzero().squeeze(-1)
    if r.numel():
        ps = ls[r].exp()
        t_masked = torch.mul(lt[r], 0.0).nan_to_num_(nan=1.0)  # 1 where pi_T = 0, else 0
        outside = t_masked.mul_(ps)
        p_out = outside.sum(dim=-1)
        p_in = ps.sub_(outside).sum(dim=-1)
        jump0_all[r] = torch.where(p_out < 0.5, -torch.log1p(-p_out.clamp(max=0.5)), -torch.log(p_in))
        logq[r] += jump0_all[r].unsqueeze(-1)
    jump0_all = torch.where(has_joint, jump0_all, inf)
    return t_in_s, identical, logq, has_joint, jump0_all


def _centred(xs: Tensor, xt: Tensor, logq: Tensor, jump0_all: Tensor, cand: Tensor, ws: Optional[dict]):
    """On the candidate rows ``idx``: jump0, log q, q, the centred d, Var_q[d] and K(1-)."""
    # d = log pi_T - log pi_S up to a per-row constant, from the logits (no log-softmax round-off);
    # off J it is set to 0 (only finiteness matters there: q = mu = 0).
    if bool(cand.all()):
        idx = torch.arange(xs.shape[0], device=xs.device)
        jump0 = jump0_all
        draw = torch.sub(xt, xs)
    else:
        idx = cand.nonzero().squeeze(-1)
        jump0 = jump0_all[idx]
        logq = logq[idx]
        draw = xt[idx].sub_(xs[idx])
    draw.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    q = logq.exp()
    m = torch.mul(q, draw).sum(dim=-1, keepdim=True)
    dc = draw.sub_(m)
    var0 = torch.mul(q, dc).mul_(dc).sum(dim=-1)
    kl1, _, _ = _evaluate(logq, q, dc, torch.ones_like(jump0), need_var=False, ws=ws)
    return idx, jump0, logq, q, dc, var0, kl1


def _prepare(
    student_logits: Tensor, teacher_logits: Tensor, eps, dtype: torch.dtype, ws: Optional[dict] = None
) -> _Prepared:
    """Log-softmax both models once, resolve the exact cases, precompute q, d for the rest."""
    xs, xt, ls, lt, eps_f, batch_shape = _inputs(student_logits, teacher_logits, eps, dtype)
    inf = float("inf")
    t_in_s, identical, logq, has_joint, jump0_all = _supports(ls, lt, dtype)
    inf_eps = torch.isinf(eps_f)
    one = identical | inf_eps
    kl_all = torch.where(one & ~identical, inf, 0.0).to(dtype)
    cand = has_joint & ~identical & (eps_f > 0) & (jump0_all <= eps_f)
    idx, jump0, logq, q, dc, var0, kl1 = _centred(xs, xt, logq, jump0_all, cand, ws)

    f1 = kl1 + jump0  # = KL(pi_T || pi_S) when supp T is inside supp S
    e_c = eps_f[idx]
    feas1 = f1 <= e_c
    epsp = e_c - jump0
    tis = t_in_s[idx]
    c_one = tis & feas1
    c_near = ~tis & feas1 & ~inf_eps[idx]
    c_solve = ~feas1 & (epsp > 0)
    one[idx[c_one]] = True
    kl_all[idx[c_one]] = f1[c_one]

    out = ls  # fresh tensor owned here; rows are overwritten in place
    one_rows = one.nonzero().squeeze(-1)
    if one_rows.numel():
        out[one_rows] = lt[one_rows]
    keep = c_near | c_solve
    if not bool(keep.all()):
        k = keep.nonzero().squeeze(-1)
        idx, logq, q, dc = idx[k], logq[k], q[k], dc[k]
        jump0, epsp, kl1, var0, c_solve = jump0[k], epsp[k], kl1[k], var0[k], c_solve[k]
    return _Prepared(
        out=out,
        beta=one.to(dtype),
        kl=kl_all,
        eps=eps_f,
        batch_shape=batch_shape,
        idx=idx,
        logq=logq,
        q=q,
        dc=dc,
        jump0=jump0,
        epsp=epsp,
        kl1=kl1,
        var0=var0,
        is_solve=c_solve,
    )


_RGAP = 2e-4  # a converged row uses the budget to within this relative gap: K(b) >= epsp (1 - _RGAP)


def _newton_step(kl: Tensor, var: Tensor, bb: Tensor, e: Tensor, lo: Tensor, hi: Tensor, tol: float):
    """One safeguarded Newton step on H(b) = sqrt(K(b)) - sqrt(e) from the evaluation at ``bb``:
    (next b, bracket lo, hi, converged, bracket collapsed to float resolution)."""
    ulp = torch.finfo(bb.dtype).eps
    rgap = _RGAP
    feas = kl <= e
    lo_r = torch.where(feas, bb, lo)
    hi_r = torch.where(feas, hi, bb)
    sk, se = kl.sqrt(), e.sqrt()
    step = -2.0 * sk * (sk - se) / (bb * var)
    conv = feas & (((step <= tol) & (e - kl <= rgap * e)) | (kl == e))
    collapsed = (hi_r - lo_r) <= 4.0 * ulp * hi_r
    # from the infeasible side aim just inside: K(root - margin) ~ epsp (1 - rgap / 4)
    margin = torch.minimum(0.25 * rgap * e / (bb * var), torch.full_like(bb, 0.25 * tol))
    bn = bb + step - torch.where(feas, 0.0, margin)
    bad = ~torch.isfinite(bn) | (bn <= lo_r) | (bn >= hi_r)
    bn = torch.where(bad, 0.5 * (lo_r + hi_r), bn)
    return bn, lo_r, hi_r, conv, collapsed


def _newton(
    logq: Tensor,
    q: Tensor,
    dc: Tensor,
    epsp: Tensor,
    kl1: Tensor,
    var0: Tensor,
    tol: float,
    max_iter: int,
    out: Optional[Tensor] = None,
    out_rows: Optional[Tensor] = None,
    ws: Optional[dict] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Vectorised safeguarded Newton for K(b) = epsp, 0 < epsp < K(1-).

    Newton is run on H(b) = sqrt(K(b)) - sqrt(epsp), H'(b) = b Var_mu[d] / (2 sqrt K(b)), inside a bracket
    [lo, hi] (K(lo) <= epsp < K(hi)) updated after every evaluation; a step that leaves the bracket (or is not
    finite, e.g. Var ~ 0) is replaced by bisection.  A row stops when it sits on the feasible side with
    Newton step <= tol and K(b) >= epsp (1 - 2e-4), or when its bracket has collapsed to float resolution;
    rows still running after max_iter return lo.  Rows are evaluated together; finished rows are frozen and
    dropped from the working set once they are the majority.  If `out` is given, log mu of rows that finish
    at an evaluated point is written to out[out_rows[row]] and `cached` is set.
    Returns (beta, iters, K(beta) where cached, cached).
    """
    n = epsp.shape[0]
    device = epsp.device
    b = torch.sqrt(2.0 * epsp / var0)  # Newton step of H from b = 0 (K ~ b^2 Var_q / 2)
    b = torch.where(torch.isfinite(b) & (b > 0) & (b < 1), b, torch.sqrt(epsp / kl1))  # secant of H on [0, 1]
    b = torch.where(torch.isfinite(b) & (b > 0) & (b < 1), b, torch.full_like(b, 0.5))
    lo = torch.zeros_like(b)
    hi = torch.ones_like(b)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    cached = torch.zeros(n, dtype=torch.bool, device=device)
    kl_res = torch.zeros_like(b)
    iters = torch.zeros(n, dtype=torch.int64, device=device)
    work = torch.arange(n, device=device)
    wl, wq, wd = logq, q, dc
    ws = {} if ws is None else ws  # scratch buffers reused across iterations
    for _ in range(max_iter):
        if work.numel() == 0:
            break
        alive = (~done[work]).nonzero().squeeze(-1)
        kl_w, var_w, logmu_w = _evaluate(wl, wq, wd, b[work], need_logmu=out is not None, ws=ws)
        rows = work[alive]
        kl, var = kl_w[alive], var_w[alive]
        bb, e = b[rows], epsp[rows]
        iters[rows] += 1
        bn, lo_r, hi_r, conv, collapsed = _newton_step(kl, var, bb, e, lo[rows], hi[rows], tol)
        b[rows] = torch.where(conv, bb, torch.where(collapsed, lo_r, bn))
        lo[rows], hi[rows] = lo_r, hi_r
        done[rows] = conv | collapsed
        if bool(conv.any()):
            cr = rows[conv]
            kl_res[cr] = kl[conv]
            cached[cr] = out is not None
            if out is not None:
                out[out_rows[cr]] = logmu_w[alive[conv]]
        still = ~done[work]
        n_still = int(still.sum())
        if n_still == 0:
            break
        if n_still <= 0.5 * work.numel():  # compact the working set
            work = work[still]
            wl, wq, wd = wl[still], wq[still], wd[still]
    b = torch.where(done, b, lo)  # max_iter reached: feasible end of the bracket
    return b, iters, kl_res, cached



def _finalize(
    prep: _Prepared, beta_m: Tensor, iters_m: Tensor, kl_m: Optional[Tensor] = None, cached: Optional[Tensor] = None
) -> BlendResult:
    """Write mixed rows (prep.idx) into the outputs.  Rows with beta_m == 0 keep mu = pi_S, kl = 0;
    rows not `cached` (log mu already in prep.out, K in kl_m) are evaluated once more at beta_m."""
    out, beta, kl = prep.out, prep.beta, prep.kl
    iters = torch.zeros(out.shape[0], dtype=torch.int64, device=out.device)
    if prep.idx.numel():
        if cached is None:
            cached = torch.zeros_like(beta_m, dtype=torch.bool)
            kl_m = torch.zeros_like(beta_m)
        need = ((beta_m > 0) & ~cached).nonzero().squeeze(-1)
        kq = torch.where(cached, kl_m, 0.0)
        if need.numel():
            k, _, logmu = _evaluate(
                prep.logq[need], prep.q[need], prep.dc[need], beta_m[need], need_var=False, need_logmu=True
            )
            out[prep.idx[need]] = logmu
            kq[need] = k
        beta[prep.idx] = beta_m
        kl[prep.idx] = torch.where(beta_m > 0, kq + prep.jump0, 0.0)
        iters[prep.idx] = iters_m
    shp = prep.batch_shape
    return BlendResult(
        logprobs=out.reshape(*shp, out.shape[-1]), beta=beta.reshape(shp), kl=kl.reshape(shp), iters=iters.reshape(shp)
    )



@torch.no_grad()
def trust_region_blend(
    student_logits: Tensor,
    teacher_logits: Tensor,
    eps: Union[float, Tensor],
    *,
    tol: float = 1e-6,
    max_iter: int = 30,
    dtype: torch.dtype = torch.float32,
) -> BlendResult:
    """Behaviour policy mu_b ~ pi_S^(1-b) pi_T^b with the largest b in [0,1] s.t. KL(mu_b||pi_S) <= eps.

    Args:
        student_logits, teacher_logits: [..., V] logits of any float dtype (-inf = masked token); they are
            broadcast together and converted to ``dtype`` (float32 by default; float64 allowed).  Rows are
            sanitised like :func:`safe_log_softmax` (an all -inf row is uniform).
        eps: trust-region radius in nats, >= 0: a float or a tensor broadcastable to the batch shape.
        tol: tolerance on beta (the returned beta is within ~tol below the true root).
        max_iter: cap on Newton iterations (rows still unconverged return the feasible end of the bracket).

    Exact cases (iters = 0): identical distributions -> beta = 1, kl = 0 (any eps, including 0);
    otherwise eps == 0 -> beta = 0, mu = pi_S; KL(pi_T || pi_S) <= eps -> beta = 1, mu = pi_T (eps = inf
    always gives beta = 1); -log pi_S(supp pi_S & supp pi_T) >= eps, including disjoint supports -> beta = 0,
    mu = pi_S; supp pi_T not inside supp pi_S but lim_{b->1} KL(mu_b || pi_S) <= eps -> beta = nextafter(1, 0).
    Guarantees: kl <= eps up to float round-off (<< 1e-6); for solver rows kl >= eps * (1 - 2e-4) unless
    max_iter was hit or K(b) jumps by more than that between adjacent floats of b (bracket collapsed to float
    resolution, e.g. logits ~1e4 in float32); logprobs are exactly -inf off the support of mu.  Runs under
    no_grad (outputs carry no autograd graph).
    """
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    ws: dict = {}  # scratch buffers shared by the b = 1 evaluation and the Newton iterations
    prep = _prepare(student_logits, teacher_logits, eps, dtype, ws)
    M = prep.idx.numel()
    device = prep.out.device
    beta_m = torch.zeros(M, dtype=dtype, device=device)
    iters_m = torch.zeros(M, dtype=torch.int64, device=device)
    kl_m = torch.zeros(M, dtype=dtype, device=device)
    cached = torch.zeros(M, dtype=torch.bool, device=device)
    if M:
        one = torch.ones((), dtype=dtype, device=device)
        beta_m[~prep.is_solve] = torch.nextafter(one, torch.zeros_like(one))
        if bool(prep.is_solve.all()):
            beta_m, iters_m, kl_m, cached = _newton(
                prep.logq, prep.q, prep.dc, prep.epsp, prep.kl1, prep.var0, tol, max_iter, prep.out, prep.idx, ws
            )
        else:
            s = prep.is_solve.nonzero().squeeze(-1)
            if s.numel():
                bs, its, ks, cs = _newton(
                    prep.logq[s], prep.q[s], prep.dc[s], prep.epsp[s], prep.kl1[s], prep.var0[s],
                    tol, max_iter, prep.out, prep.idx[s], ws,
                )
                beta_m[s], iters_m[s], kl_m[s], cached[s] = bs, its, ks, cs
    return _finalize(prep, beta_m, iters_m, kl_m, cached)



def trust_region_blend_bisection(
    student_logits: Tensor,
    teacher_logits: Tensor,
    eps: Union[float, Tensor],
    *,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.float32,
) -> BlendResult:
    """The reference solver: :func:`trust_region_blend` with its root found by plain bisection on beta
    (the same preparation, exact cases and final recomputation; ~20 iterations where Newton takes 2-4).
    Slower and simpler: the baseline of ``bench/bench_solver.py`` and a cross-check of the Newton solver."""
    ws: dict = {}
    prep = _prepare(student_logits, teacher_logits, eps, dtype, ws)
    M = prep.idx.numel()
    beta_m = torch.zeros(M, dtype=dtype)
    iters_m = torch.zeros(M, dtype=torch.int64)
    if M:
        one = torch.ones((), dtype=dtype)
        beta_m[~prep.is_solve] = torch.nextafter(one, torch.zeros_like(one))
        s = prep.is_solve.nonzero().squeeze(-1)
        if s.numel():
            logq, q, dc, epsp = prep.logq[s], prep.q[s], prep.dc[s], prep.epsp[s]
            lo, hi = torch.zeros_like(epsp), torch.ones_like(epsp)
            its = torch.zeros(s.numel(), dtype=torch.int64)
            while True:
                active = (hi - lo) > tol
                if not bool(active.any()):
                    break
                a = active.nonzero().squeeze(-1)
                mid = 0.5 * (lo[a] + hi[a])
                k, _, _ = _evaluate(logq[a], q[a], dc[a], mid, need_var=False, ws=ws)
                ok = k <= epsp[a]
                lo[a] = torch.where(ok, mid, lo[a])
                hi[a] = torch.where(ok, hi[a], mid)
                its[a] += 1
            beta_m[s] = lo
            iters_m[s] = its
    return _finalize(prep, beta_m, iters_m)

