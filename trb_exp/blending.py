"""Trust-Region Behaviour Blending (TRB): the per-token behaviour-policy solver.

Behaviour policy: mu_b = softmax((1-b) logp_S + b logp_T) = pi_S exp(b d) / Z(b), d = logp_T - logp_S, with b the
LARGEST value in [0, 1] such that KL(mu_b || pi_S) <= eps.  mu_b is the I-projection argmin_q KL(q || pi_T)
s.t. KL(q || pi_S) <= eps (stationarity: q ~ pi_T^(1/(1+l)) pi_S^(l/(1+l)), l the multiplier).
Let J = supp pi_S & supp pi_T, q = pi_S restricted to J and renormalised, jump0 = -log pi_S(J).  For 0 < b < 1,
mu_b lives on J and KL(mu_b || pi_S) = jump0 + K(b), K(b) = b E_mu[d] - log E_q[exp(b d)], K(0) = 0 and
K'(b) = b Var_{mu_b}[d] >= 0 ((log Z)' = E_mu[d], (log Z)'' = Var_mu[d]), so KL is non-decreasing in b.
-inf semantics (support = tokens with a finite log-probability):
  * pi_T = 0 < pi_S somewhere: mu_b drops those tokens for every b > 0, so KL jumps at b = 0+ to jump0;
    jump0 >= eps gives b = 0 (mu = pi_S).  Disjoint supports: jump0 = inf, b = 0.
  * pi_S = 0 < pi_T somewhere: KL(pi_T || pi_S) = inf, so b = 1 is infeasible (jump at b = 1).  If even
    lim_{b->1} KL <= eps the supremum is not attained and b = nextafter(1, 0) is returned.
Solver: safeguarded Newton on H(b) = sqrt(K) - sqrt(eps - jump0) (same root as f = KL - eps and nearly linear,
K ~ b^2 Var/2; H' = b Var / (2 sqrt K) is finite at 0), from b0 = sqrt(2 (eps - jump0) / Var_q[d]), inside a
bracket [lo feasible, hi] shrunk by every evaluation, bisecting whenever a Newton step leaves it.
K is summed as sum_i q_i phi(v_i), v = log(mu/q), phi(v) = 1 + (v-1) e^v >= 0 (Taylor series for small |v|):
non-negative terms, first-order insensitive to the rounding of log Z, so float32 stays accurate down to eps ~ 1e-7.
"""


from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "BlendResult",
    "trust_region_blend",
    "trust_region_blend_bisection",
    "trust_region_blend_device",
    "geometric_mixture",
    "kl_divergence",
    "kl_behavior_student",
    "kl_teacher_student",
    "merge_eos",
    "safe_log_softmax",
]


class BlendResult(NamedTuple):
    """Output of :func:`trust_region_blend` (all tensors detached)."""

    logprobs: Tensor  # [..., V] log mu_b, normalised over the last dim, compute dtype; -inf off mu's support
    beta: Tensor  # [...] blend weight on the teacher, compute dtype
    kl: Tensor  # [...] realised KL(mu_b || pi_S) in nats, compute dtype
    iters: Tensor  # [...] int64 solver iterations (0 for rows resolved by an exact case)


# --------------------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------------------

_NEG_INF = float("-inf")


def _check_float_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")


def _sanitize_logits(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Return (clean_logits, log_softmax(clean_logits)) for logits already in the compute dtype.

    Rows that a plain log_softmax would turn into NaN are repaired first:
      * NaN entries are treated as -inf (masked);
      * if a row contains +inf, the distribution is uniform over its +inf entries;
      * a row whose entries are all -inf becomes the uniform distribution over the vocabulary.
    Healthy rows cost one log_softmax plus one NaN check.
    """
    lp = torch.log_softmax(x, dim=-1)
    if x.numel() == 0:
        return x, lp
    bad = torch.isnan(lp.amax(dim=-1))  # amax propagates NaN: one cheap reduction, no [.., V] temporary
    if bool(bad.any()):
        xb = x[bad]
        xb = torch.where(torch.isnan(xb), _NEG_INF, xb)
        pos = torch.isposinf(xb)
        has_pos = pos.any(dim=-1, keepdim=True)
        xb = torch.where(has_pos, torch.where(pos, 0.0, _NEG_INF), xb)
        all_masked = torch.isneginf(xb).all(dim=-1, keepdim=True)
        xb = torch.where(all_masked, 0.0, xb)
        x = x.clone()
        x[bad] = xb
        lp = lp.clone()
        lp[bad] = torch.log_softmax(xb, dim=-1)
    return x, lp


def safe_log_softmax(logits: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """log_softmax over the last dim, computed in ``dtype``, that never returns NaN.

    Masked tokens (-inf logits) get log-probability -inf.  Degenerate rows are mapped as follows:
    a row whose logits are all -inf (a fully masked / padding position) becomes the UNIFORM
    distribution over the vocabulary (log(1/V) everywhere); NaN logits are treated as -inf; a row with
    +inf logits becomes uniform over its +inf entries.
    """
    _check_float_dtype(dtype)
    return _sanitize_logits(logits.to(dtype))[1]


def _mixture_dtype(a: Tensor, b: Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        _check_float_dtype(dtype)
        return dtype
    out = torch.promote_types(a.dtype, b.dtype)
    if not out.is_floating_point or torch.finfo(out).bits < 32:
        out = torch.promote_types(out, torch.float32)
    return out


def geometric_mixture(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    beta: Union[float, Tensor],
    *,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """log of the normalised geometric mixture  pi_S^(1-beta) * pi_T^beta  over the last dim.

    ``beta`` is a float or a tensor broadcastable to the batch shape (it is broadcast over the vocab).
    Exact at the ends: beta == 0 returns log_softmax(student), beta == 1 returns log_softmax(teacher).
    For 0 < beta < 1 the support is the intersection of the two supports (-inf elsewhere); if that
    intersection is empty the mixture is undefined and the student distribution is returned for that
    row.  Computed in ``dtype`` (default: promotion of the inputs, at least float32); never NaN.
    """
    cd = _mixture_dtype(student_logprobs, teacher_logprobs, dtype)
    ls = safe_log_softmax(student_logprobs, cd)
    lt = safe_log_softmax(teacher_logprobs, cd)
    ls, lt = torch.broadcast_tensors(ls, lt)
    b = torch.as_tensor(beta, dtype=cd, device=ls.device)
    b = torch.broadcast_to(b, ls.shape[:-1]).unsqueeze(-1)
    joint = torch.isfinite(ls) & torch.isfinite(lt)
    z = torch.where(joint, ls + b * torch.where(joint, lt - ls, 0.0), _NEG_INF)
    has_joint = joint.any(dim=-1, keepdim=True)
    mixed = torch.log_softmax(torch.where(has_joint, z, 0.0), dim=-1)
    mixed = torch.where(has_joint, mixed, ls)
    return torch.where(b == 0, ls, torch.where(b == 1, lt, mixed))


def kl_divergence(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p || q) = sum_x p(x) (log p(x) - log q(x)) over the last dim, for normalised log-probs.

    Conventions: 0 * log 0 = 0 (terms with log p = -inf contribute 0); a token with finite log p and
    log q = -inf makes the result +inf (even if exp(log p) underflows); tiny negative round-off is
    clamped to 0.  Never NaN for inputs that contain no NaN / +inf.  Computed in the promoted dtype.
    """
    inf = float("inf")
    diff = torch.sub(p_logprobs, q_logprobs)  # +inf: p > 0 = q;  -inf: p = 0 < q;  NaN: both zero
    diff.nan_to_num_(nan=0.0, posinf=inf, neginf=-inf)
    outside = diff.amax(dim=-1) == inf
    big = torch.finfo(diff.dtype).max
    term = diff.clamp_(-big, big).mul_(p_logprobs.exp())  # -big * 0 = 0 where p = 0
    return torch.where(outside, inf, term.sum(dim=-1)).clamp_min(0.0)


def kl_behavior_student(mu_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """KL(mu || pi_S): the trust-region quantity bounded by eps."""
    return kl_divergence(mu_logprobs, student_logprobs)


def kl_teacher_student(teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """KL(pi_T || pi_S): the value of KL(mu_b || pi_S) at b = 1 (the 'gap' to the teacher)."""
    return kl_divergence(teacher_logprobs, student_logprobs)


def merge_eos(x: Tensor, eos_ids, keep_id: int) -> Tensor:
    """Merge several end-of-sequence tokens into ONE event at ``keep_id``, over the last dim.

    ``x`` holds logits or log-probabilities ``[..., V]``.  The entry at ``keep_id`` becomes
    ``logsumexp(x[..., ids])`` over ``ids = set(eos_ids) | {keep_id}`` and the other ids get ``-inf``: the
    probability of "the sequence ends" is the sum of the EOS probabilities, every other token is unchanged
    and the normaliser is preserved (log-probs stay normalised, logits keep their softmax).  Use it on BOTH
    models when student and teacher end sequences with different ids (a Base student's ``<|endoftext|>``,
    an instruct teacher's ``<|im_end|>``), before blending and before the loss.

    With a single distinct id it returns ``x`` itself (no copy, zero cost).  Otherwise the result is a new
    tensor (``x`` is not modified); gradients flow to every EOS entry of ``x`` through the logsumexp.
    Idempotent: merging twice is the same as merging once.
    """
    keep_id = int(keep_id)
    ids = list(dict.fromkeys([keep_id, *(int(i) for i in eos_ids)]))
    if len(ids) == 1:
        return x
    V = x.shape[-1]
    bad = [i for i in ids if not 0 <= i < V]
    if bad:
        raise ValueError(f"eos id {bad[0]} is outside the vocabulary [0, {V})")
    idx = torch.tensor(ids, device=x.device)
    merged = torch.logsumexp(x.index_select(-1, idx), dim=-1)
    out = x.clone()
    out[..., keep_id] = merged
    out[..., idx[1:]] = _NEG_INF
    return out


# --------------------------------------------------------------------------------------------------
# solver internals (private; trust_region_blend_bisection reuses them)
# --------------------------------------------------------------------------------------------------

# phi(v) = 1 + (v - 1) e^v = sum_{k>=2} (k-1)/k! v^k ; Horner coefficients for k = 8, 7, ..., 2
_PHI_COEFFS = tuple((k - 1) / math.factorial(k) for k in range(8, 1, -1))
_PHI_SERIES_CUTOFF = 0.3  # |v| < 0.3: series (truncation < 1e-8 rel.); above: direct form (rel. error ~1e-6)


def _buffer(ws: Optional[dict], name: str, like: Tensor) -> Tensor:
    """Scratch tensor shaped like `like`, reused across calls through the workspace dict `ws`."""
    if ws is None:
        return torch.empty_like(like)
    t = ws.get(name)
    if t is None or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        t = ws[name] = torch.empty_like(like)
    return t


def _evaluate(
    logq: Tensor,
    q: Tensor,
    dc: Tensor,
    b: Tensor,
    *,
    need_var: bool = True,
    need_logmu: bool = False,
    ws: Optional[dict] = None,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """K(b) = KL(mu_b || q) per row, optionally Var_{mu_b}[d] and log mu_b.

    logq: [n, V] log q (-inf off the joint support J; every row has J non-empty), q = exp(logq),
    dc: [n, V] centred d on J (any finite value off J), b: [n].  One max/exp/sum (logsumexp) pass plus
    O(V) elementwise work, in place into scratch buffers (`ws` keeps them across iterations: on CPU,
    fresh vocab-sized allocations and bool masks / torch.where cost several times an arithmetic pass).
    The returned log mu lives in the workspace when `ws` is given (copy it before the next call).

    K = sum_i q_i phi(v_i) with v = log(mu/q) and phi(v) = 1 + (v - 1) e^v >= 0: exact when sum q = sum mu = 1,
    every term non-negative, and a shift of log Z changes K only at relative first order.  phi is taken from
    its Taylor series for |v| < 0.3 and from q + (v - 1) mu above (blended by a 0/1 float indicator).
    """
    w = torch.mul(dc, b.unsqueeze(-1), out=_buffer(ws, "w", dc))
    z = torch.add(logq, w, out=_buffer(ws, "z", dc))
    mx = z.amax(dim=-1, keepdim=True)
    z.sub_(mx)
    e = torch.exp(z, out=_buffer(ws, "e", dc)) if need_logmu else z.exp_()
    s = e.sum(dim=-1, keepdim=True)
    log_s = s.log()
    mu = e.div_(s)
    v = w.sub_(mx + log_s)  # log(mu / q) on J, finite everywhere
    direct = torch.sub(v, 1.0, out=_buffer(ws, "direct", dc)).mul_(mu).add_(q)  # q phi(v) for |v| >= cutoff
    vc = torch.clamp(v, -_PHI_SERIES_CUTOFF, _PHI_SERIES_CUTOFF, out=_buffer(ws, "vc", dc))  # series stays finite
    p = torch.mul(vc, _PHI_COEFFS[0], out=_buffer(ws, "p", dc)).add_(_PHI_COEFFS[1])
    for c in _PHI_COEFFS[2:]:
        p.mul_(vc).add_(c)
    p.mul_(vc).mul_(vc).mul_(q)  # q phi(v) for |v| < cutoff
    ind = v.abs_().sub_(_PHI_SERIES_CUTOFF).mul_(-1e30).clamp_(0.0, 1.0)  # 1 where |v| < cutoff (v consumed)
    kl = p.sub_(direct).mul_(ind).add_(direct).clamp_(min=0.0).sum(dim=-1)
    var = None
    if need_var:
        t = torch.mul(mu, dc, out=direct)
        m1 = t.sum(dim=-1, keepdim=True)
        var = torch.sub(dc, m1, out=t).square_().mul_(mu).sum(dim=-1)
    logmu = z.sub_(log_s) if need_logmu else None
    return kl, var, logmu


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


def _prepare(
    student_logits: Tensor, teacher_logits: Tensor, eps, dtype: torch.dtype, ws: Optional[dict] = None
) -> _Prepared:
    """Log-softmax both models once, resolve the exact cases, precompute q, d for the rest.

    Support bookkeeping uses float reductions (amax/amin of lt - ls, NaN/inf sentinels) rather than bool
    masks, which are slow on CPU for vocab-sized tensors.
    """
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
    N = xs.shape[0]
    device = xs.device
    inf = float("inf")
    eps_f = _as_eps(eps, batch_shape, dtype, device)
    xs, ls = _sanitize_logits(xs)
    xt, lt = _sanitize_logits(xt)

    # dl = lt - ls: +inf on teacher-only tokens, -inf on student-only tokens, NaN (-> 0) if masked in both
    dl = torch.sub(lt, ls).nan_to_num_(nan=0.0, posinf=inf, neginf=-inf)
    dl_max, dl_min = dl.amax(dim=-1), dl.amin(dim=-1)
    del dl
    t_in_s = dl_max < inf
    s_only = dl_min == -inf  # rows where pi_S has mass outside supp(pi_T): KL jumps at b = 0+
    identical = (dl_max == 0) & (dl_min == 0)
    inf_eps = torch.isinf(eps_f)

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

    one = identical | inf_eps
    kl_all = torch.where(one & ~identical, inf, 0.0).to(dtype)
    cand = has_joint & ~identical & (eps_f > 0) & (jump0_all <= eps_f)
    # d = log pi_T - log pi_S up to a per-row constant, from the logits (no log-softmax round-off);
    # off J it is set to 0 (only finiteness matters there: q = mu = 0).
    if bool(cand.all()):
        idx = torch.arange(N, device=device)
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
    dtype, device = epsp.dtype, epsp.device
    ulp = torch.finfo(dtype).eps
    b = torch.sqrt(2.0 * epsp / var0)  # Newton step of H from b = 0 (K ~ b^2 Var_q / 2)
    b = torch.where(torch.isfinite(b) & (b > 0) & (b < 1), b, torch.sqrt(epsp / kl1))  # secant of H on [0, 1]
    b = torch.where(torch.isfinite(b) & (b > 0) & (b < 1), b, torch.full_like(b, 0.5))
    lo = torch.zeros_like(b)
    hi = torch.ones_like(b)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    cached = torch.zeros(n, dtype=torch.bool, device=device)
    kl_res = torch.zeros_like(b)
    iters = torch.zeros(n, dtype=torch.int64, device=device)
    rgap = 2e-4
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
        feas = kl <= e
        lo_r = torch.where(feas, bb, lo[rows])
        hi_r = torch.where(feas, hi[rows], bb)
        sk, se = kl.sqrt(), e.sqrt()
        step = -2.0 * sk * (sk - se) / (bb * var)
        conv = feas & (((step <= tol) & (e - kl <= rgap * e)) | (kl == e))
        collapsed = (hi_r - lo_r) <= 4.0 * ulp * hi_r
        # from the infeasible side aim just inside: K(root - margin) ~ epsp (1 - rgap / 4)
        margin = torch.minimum(0.25 * rgap * e / (bb * var), torch.full_like(bb, 0.25 * tol))
        bn = bb + step - torch.where(feas, 0.0, margin)
        bad = ~torch.isfinite(bn) | (bn <= lo_r) | (bn >= hi_r)
        bn = torch.where(bad, 0.5 * (lo_r + hi_r), bn)
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


# --------------------------------------------------------------------------------------------------
# public solver
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# the same solver without host syncs (the static decode engine)
# --------------------------------------------------------------------------------------------------


def _sanitize_logits_device(x: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`_sanitize_logits` without the data-dependent branch: every row goes through the repair
    (a no-op on healthy rows, which therefore get bit-identical log-probs)."""
    inf = float("inf")
    xb = torch.where(torch.isnan(x), -inf, x)
    pos = torch.isposinf(xb)
    xb = torch.where(pos.any(dim=-1, keepdim=True), torch.where(pos, 0.0, -inf), xb)
    xb = torch.where(torch.isneginf(xb).all(dim=-1, keepdim=True), 0.0, xb)
    return xb, torch.log_softmax(xb, dim=-1)


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
    Slower and simpler: the baseline of ``scripts/bench_solver.py`` and a cross-check of the Newton solver."""
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


@torch.no_grad()
def trust_region_blend_device(
    student_logits: Tensor,
    teacher_logits: Tensor,
    eps: Union[float, Tensor],
    *,
    tol: float = 1e-6,
    max_iter: int = 30,
    fixed_iters: bool = False,
    dtype: torch.dtype = torch.float32,
) -> BlendResult:
    """:func:`trust_region_blend` with no host synchronisation: the same exact cases, the same safeguarded
    Newton iteration and the same stopping test, computed on every row at once with ``torch.where`` (no
    boolean indexing, no ``nonzero``, no working-set compaction), so it can run inside a captured decode
    step. Rows that converge are frozen; their log mu is taken from the converging evaluation, as in the
    exact solver, so the results agree row for row up to float round-off.

    Stopping: ``fixed_iters=True`` runs exactly ``max_iter`` Newton iterations (no sync at all; rows still
    running return the feasible end of their bracket: ``kl <= eps`` always holds, the budget is used to the
    solver's tolerance once every row has converged, 3-5 iterations on real logits). ``fixed_iters=False``
    stops as soon as every row has converged, read on the host every iteration on a CPU (free there) and
    every 4 iterations on a GPU. ``eps`` must be >= 0 (not checked on the device).
    """
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol}")
    if isinstance(eps, (int, float)) and not eps >= 0:
        raise ValueError(f"eps must be >= 0 (the KL trust-region radius in nats), got eps={eps}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher vocab sizes differ: {student_logits.shape[-1]} vs {teacher_logits.shape[-1]}"
        )
    inf = float("inf")
    xs, xt = torch.broadcast_tensors(student_logits.to(dtype), teacher_logits.to(dtype))
    batch_shape = xs.shape[:-1]
    V = xs.shape[-1]
    xs, xt = xs.reshape(-1, V), xt.reshape(-1, V)
    device = xs.device
    host_free = device.type == "cpu" and not fixed_iters  # reading a CPU tensor costs no device sync
    finite = host_free and bool(torch.isfinite(xs).all() & torch.isfinite(xt).all())  # skip the repairs
    if finite:
        ls, lt = torch.log_softmax(xs, dim=-1), torch.log_softmax(xt, dim=-1)
    else:
        xs, ls = _sanitize_logits_device(xs)
        xt, lt = _sanitize_logits_device(xt)
    eps_f = torch.broadcast_to(torch.as_tensor(eps, dtype=dtype, device=device), batch_shape).reshape(-1)

    dl = torch.sub(lt, ls).nan_to_num_(nan=0.0, posinf=inf, neginf=-inf)
    dl_max, dl_min = dl.amax(dim=-1), dl.amin(dim=-1)
    del dl
    t_in_s = dl_max < inf
    s_only = dl_min == -inf
    identical = (dl_max == 0) & (dl_min == 0)
    inf_eps = torch.isinf(eps_f)
    if finite:  # every token in both supports: J = V, q = pi_S, jump0 = 0 (what the general branch gives)
        logq = ls.clone()
        has_joint = torch.ones_like(s_only)
        jump0 = torch.zeros_like(dl_max)
    else:
        logq = torch.mul(lt, 0.0).add_(ls).nan_to_num_(nan=-inf, posinf=inf, neginf=-inf)
        has_joint = logq.amax(dim=-1) > -inf
        # jump0 = -log pi_S(J) on rows where pi_S has mass outside the teacher's support, else 0
        ps = ls.exp()
        outside = torch.mul(lt, 0.0).nan_to_num_(nan=1.0).mul_(ps)
        p_out = outside.sum(dim=-1)
        p_in = ps.sub_(outside).sum(dim=-1)
        j = torch.where(p_out < 0.5, -torch.log1p(-p_out.clamp(max=0.5)), -torch.log(p_in))
        jump0 = torch.where(s_only & has_joint, j, 0.0)
        logq = logq.add_(jump0.unsqueeze(-1))
        jump0 = torch.where(has_joint, jump0, inf)

    one = identical | inf_eps
    kl_all = torch.where(one & ~identical, inf, 0.0).to(dtype)
    cand = has_joint & ~identical & (eps_f > 0) & (jump0 <= eps_f)
    draw = torch.sub(xt, xs).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    q = logq.exp()
    dc = draw.sub_(torch.mul(q, draw).sum(dim=-1, keepdim=True))
    var0 = torch.mul(q, dc).mul_(dc).sum(dim=-1)
    ws: dict = {}
    kl1, _, _ = _evaluate(logq, q, dc, torch.ones_like(jump0), need_var=False, ws=ws)
    f1 = kl1 + jump0
    feas1 = f1 <= eps_f
    epsp = eps_f - jump0
    c_one = cand & t_in_s & feas1
    c_near = cand & ~t_in_s & feas1 & ~inf_eps
    c_solve = cand & ~feas1 & (epsp > 0)
    one = one | c_one
    kl_all = torch.where(c_one, f1, kl_all)
    out = torch.where(one.unsqueeze(-1), lt, ls)
    beta = one.to(dtype)

    # safeguarded Newton on the solve rows (the others are frozen from the start)
    ulp = torch.finfo(dtype).eps
    b = torch.sqrt(2.0 * epsp / var0)
    b = torch.where(torch.isfinite(b) & (b > 0) & (b < 1), b, torch.sqrt(epsp / kl1))
    b = torch.where(torch.isfinite(b) & (b > 0) & (b < 1), b, torch.full_like(b, 0.5))
    lo, hi = torch.zeros_like(b), torch.ones_like(b)
    done = ~c_solve
    conv_any = torch.zeros_like(done)
    kl_res = torch.zeros_like(b)
    iters = torch.zeros(b.shape, dtype=torch.int64, device=device)
    logmu_res = torch.zeros_like(out)
    rgap = 2e-4
    se, rgap_e = epsp.sqrt(), rgap * epsp  # loop invariants
    margin_num, margin_cap = 0.25 * rgap * epsp, torch.full_like(b, 0.25 * tol)
    check = 1 if device.type == "cpu" else 4
    if host_free and not bool(c_solve.any()):
        max_iter = 0
    for it in range(max_iter):
        if not fixed_iters and it % check == 0 and bool(done.all()):
            break
        run = ~done
        kl, var, logmu = _evaluate(logq, q, dc, b, need_logmu=True, ws=ws)
        iters += run.long()
        feas = kl <= epsp
        lo_r = torch.where(feas, b, lo)
        hi_r = torch.where(feas, hi, b)
        sk = kl.sqrt()
        bvar = b * var
        step = -2.0 * sk * (sk - se) / bvar
        conv = feas & (((step <= tol) & (epsp - kl <= rgap_e)) | (kl == epsp))
        collapsed = (hi_r - lo_r) <= 4.0 * ulp * hi_r
        margin = torch.minimum(margin_num / bvar, margin_cap)
        bn = b + step - torch.where(feas, 0.0, margin)
        bad = ~torch.isfinite(bn) | (bn <= lo_r) | (bn >= hi_r)
        bn = torch.where(bad, 0.5 * (lo_r + hi_r), bn)
        b = torch.where(run, torch.where(conv, b, torch.where(collapsed, lo_r, bn)), b)
        lo, hi = lo_r, hi_r  # a finished row's bracket is never read again (its b is frozen above)
        newly = run & conv
        kl_res = torch.where(newly, kl, kl_res)
        conv_any = conv_any | newly
        logmu_res = torch.where(newly.unsqueeze(-1), logmu, logmu_res)
        done = done | (run & (conv | collapsed))
    b = torch.where(done, b, lo)

    # near-one rows: beta = nextafter(1, 0); every mixed row that did not converge at an evaluated point is
    # evaluated once more at its final beta
    one_t = torch.ones((), dtype=dtype, device=device)
    b = torch.where(c_near, torch.nextafter(one_t, torch.zeros_like(one_t)), b)
    mixed = c_near | c_solve
    use_res = conv_any & c_solve
    if host_free and not bool((mixed & ~use_res & (b > 0)).any()):  # every mixed row converged: no re-evaluation
        kq, logmu_f = kl_res, logmu_res
    else:
        kq, _, logmu_f = _evaluate(logq, q, dc, b, need_var=False, need_logmu=True, ws=ws)
    kq = torch.where(use_res, kl_res, kq)
    logmu_f = torch.where(use_res.unsqueeze(-1), logmu_res, logmu_f)
    pos_b = mixed & (b > 0)
    out = torch.where(pos_b.unsqueeze(-1), logmu_f, out)
    beta = torch.where(mixed, b, beta)
    kl_all = torch.where(mixed, torch.where(b > 0, kq + jump0, 0.0), kl_all)
    iters = torch.where(c_solve, iters, 0)
    return BlendResult(
        logprobs=out.reshape(*batch_shape, V), beta=beta.reshape(batch_shape), kl=kl_all.reshape(batch_shape),
        iters=iters.reshape(batch_shape),
    )
