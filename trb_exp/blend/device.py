"""TRB's behaviour-policy solver without host synchronisation (:func:`trust_region_blend_device`), for the
static decode engine: the exact solver's cases and Newton iteration computed on every row at once."""

from __future__ import annotations

from typing import NamedTuple, Tuple, Union

import torch
from torch import Tensor

from trb_exp.blend.kernel import _evaluate
from trb_exp.blend.ops import BlendResult


def _sanitize_logits_device(x: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`_sanitize_logits` without the data-dependent branch: every row goes through the repair
    (a no-op on healthy rows, which therefore get bit-identical log-probs)."""
    inf = float("inf")
    xb = torch.where(torch.isnan(x), -inf, x)
    pos = torch.isposinf(xb)
    xb = torch.where(pos.any(dim=-1, keepdim=True), torch.where(pos, 0.0, -inf), xb)
    xb = torch.where(torch.isneginf(xb).all(dim=-1, keepdim=True), 0.0, xb)
    return xb, torch.log_softmax(xb, dim=-1)



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
    xs, xt = torch.broadcast_tensors(student_logits.to(dtype), teacher_logits.to(dtype))
    batch_shape = xs.shape[:-1]
    V = xs.shape[-1]
    xs, xt = xs.reshape(-1, V), xt.reshape(-1, V)
    host_free = xs.device.type == "cpu" and not fixed_iters  # reading a CPU tensor costs no device sync
    eps_f = torch.broadcast_to(torch.as_tensor(eps, dtype=dtype, device=xs.device), batch_shape).reshape(-1)
    c = _cases(xs, xt, eps_f, host_free)
    if host_free and not bool(c.c_solve.any()):
        max_iter = 0
    newton = _newton_host if host_free else _newton_all
    b, iters, kl_res, conv_any, logmu_res = newton(c, tol, max_iter, fixed_iters)
    out, beta, kl_all = _finish(c, b, kl_res, conv_any, logmu_res, host_free)
    iters = torch.where(c.c_solve, iters, 0)
    return BlendResult(
        logprobs=out.reshape(*batch_shape, V), beta=beta.reshape(batch_shape), kl=kl_all.reshape(batch_shape),
        iters=iters.reshape(batch_shape),
    )


class _Cases(NamedTuple):
    """Every row's exact case and the solve rows' inputs (all [N] or [N, V], nothing compacted)."""

    out: Tensor  # log pi_T on `one` rows, else log pi_S (mixed rows written at the end)
    beta: Tensor
    kl_all: Tensor
    c_near: Tensor  # supp T not inside supp S, the limit at b -> 1 feasible: beta = nextafter(1, 0)
    c_solve: Tensor  # the Newton rows
    logq: Tensor
    q: Tensor
    dc: Tensor
    jump0: Tensor
    epsp: Tensor
    kl1: Tensor
    var0: Tensor
    ws: dict


def _logq_jump0(ls: Tensor, lt: Tensor, s_only: Tensor, finite: bool):
    """log q = log pi_S + jump0 on J (-inf elsewhere), has_joint and jump0 = -log pi_S(J) (inf without J)."""
    inf = float("inf")
    if finite:  # every token in both supports: J = V, q = pi_S, jump0 = 0 (what the general branch gives)
        return ls.clone(), torch.ones_like(s_only), torch.zeros(ls.shape[0], dtype=ls.dtype, device=ls.device)
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
    return logq, has_joint, torch.where(has_joint, jump0, inf)


def _cases(xs: Tensor, xt: Tensor, eps_f: Tensor, host_free: bool) -> _Cases:
    """The exact solver's preparation on every row at once (``torch.where`` instead of row selection)."""
    inf, dtype = float("inf"), xs.dtype
    finite = host_free and bool(torch.isfinite(xs).all() & torch.isfinite(xt).all())  # skip the repairs
    if finite:
        ls, lt = torch.log_softmax(xs, dim=-1), torch.log_softmax(xt, dim=-1)
    else:
        xs, ls = _sanitize_logits_device(xs)
        xt, lt = _sanitize_logits_device(xt)
    dl = torch.sub(lt, ls).nan_to_num_(nan=0.0, posinf=inf, neginf=-inf)
    dl_max, dl_min = dl.amax(dim=-1), dl.amin(dim=-1)
    del dl
    t_in_s = dl_max < inf
    identical = (dl_max == 0) & (dl_min == 0)
    inf_eps = torch.isinf(eps_f)
    logq, has_joint, jump0 = _logq_jump0(ls, lt, dl_min == -inf, finite)
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
    return _Cases(out, one.to(dtype), kl_all, c_near, c_solve, logq, q, dc, jump0, epsp, kl1, var0, ws)


def _newton_all(c: _Cases, tol: float, max_iter: int, fixed_iters: bool):
    """Safeguarded Newton on the solve rows (the others are frozen from the start); converged rows are
    frozen with K and log mu of their converging evaluation. (b, iters, kl_res, conv_any, logmu_res)."""
    logq, q, dc, epsp, ws = c.logq, c.q, c.dc, c.epsp, c.ws
    ulp = torch.finfo(epsp.dtype).eps
    b = torch.sqrt(2.0 * epsp / c.var0)
    b = torch.where(torch.isfinite(b) & (b > 0) & (b < 1), b, torch.sqrt(epsp / c.kl1))
    b = torch.where(torch.isfinite(b) & (b > 0) & (b < 1), b, torch.full_like(b, 0.5))
    lo, hi = torch.zeros_like(b), torch.ones_like(b)
    done = ~c.c_solve
    conv_any = torch.zeros_like(done)
    kl_res = torch.zeros_like(b)
    iters = torch.zeros(b.shape, dtype=torch.int64, device=b.device)
    logmu_res = torch.zeros_like(c.out)
    rgap = 2e-4
    se, rgap_e = epsp.sqrt(), rgap * epsp  # loop invariants
    margin_num, margin_cap = 0.25 * rgap * epsp, torch.full_like(b, 0.25 * tol)
    check = 1 if b.device.type == "cpu" else 4
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
    return torch.where(done, b, lo), iters, kl_res, conv_any, logmu_res


def _newton_host(c: _Cases, tol: float, max_iter: int, fixed_iters: bool = False):
    """:func:`_newton_all` on a CPU: the same float32 arithmetic, op for op, with the per-row bookkeeping
    ([N] vectors) in NumPy, whose ops cost a fraction of a torch dispatch; only the [N, V] evaluation and
    log mu (and the square roots: torch's float32 sqrt can differ from NumPy's by an ulp) stay in torch.
    IEEE float32 +, -, *, / and comparisons (Python scalars taken as float32 in both libraries) give the
    same bits, so the iterates equal the torch loop's (checked against it in the tests)."""
    import numpy as np

    logq, q, dc, ws = c.logq, c.q, c.dc, c.ws
    epsp = c.epsp.numpy()
    ulp = float(torch.finfo(c.epsp.dtype).eps)
    bt = torch.sqrt(2.0 * c.epsp / c.var0)
    bt = torch.where(torch.isfinite(bt) & (bt > 0) & (bt < 1), bt, torch.sqrt(c.epsp / c.kl1))
    b = torch.where(torch.isfinite(bt) & (bt > 0) & (bt < 1), bt, torch.full_like(bt, 0.5)).numpy()
    lo, hi = np.zeros_like(b), np.ones_like(b)
    done = ~c.c_solve.numpy()
    conv_any = np.zeros_like(done)
    kl_res = np.zeros_like(b)
    iters = np.zeros(b.shape, dtype=np.int64)
    logmu_res = torch.zeros_like(c.out)
    rgap = 2e-4
    se, rgap_e = c.epsp.sqrt().numpy(), rgap * epsp  # loop invariants (torch's sqrt: its rounding, not NumPy's)
    margin_num, margin_cap = 0.25 * rgap * epsp, np.full_like(b, 0.25 * tol)
    with np.errstate(all="ignore"):  # inf / NaN steps are caught by the bracket test, as in torch
        for _ in range(max_iter):
            if done.all():
                break
            run = ~done
            kl_t, var_t, logmu = _evaluate(logq, q, dc, torch.from_numpy(b), need_logmu=True, ws=ws)
            kl, var = kl_t.numpy(), var_t.numpy()
            iters += run
            feas = kl <= epsp
            lo_r = np.where(feas, b, lo)
            hi_r = np.where(feas, hi, b)
            sk = kl_t.sqrt().numpy()
            bvar = b * var
            step = -2.0 * sk * (sk - se) / bvar
            conv = feas & (((step <= tol) & (epsp - kl <= rgap_e)) | (kl == epsp))
            collapsed = (hi_r - lo_r) <= 4.0 * ulp * hi_r
            margin = np.minimum(margin_num / bvar, margin_cap)
            bn = b + step - np.where(feas, np.float32(0.0), margin)
            bad = ~np.isfinite(bn) | (bn <= lo_r) | (bn >= hi_r)
            bn = np.where(bad, 0.5 * (lo_r + hi_r), bn)
            b = np.where(run, np.where(conv, b, np.where(collapsed, lo_r, bn)), b)
            lo, hi = lo_r, hi_r
            newly = run & conv
            kl_res = np.where(newly, kl, kl_res)
            conv_any = conv_any | newly
            if newly.any():
                logmu_res = torch.where(torch.from_numpy(newly).unsqueeze(-1), logmu, logmu_res)
            done = done | (run & (conv | collapsed))
    return (torch.from_numpy(np.where(done, b, lo)), torch.from_numpy(iters), torch.from_numpy(kl_res),
            torch.from_numpy(conv_any), logmu_res)


def _finish(c: _Cases, b: Tensor, kl_res: Tensor, conv_any: Tensor, logmu_res: Tensor, host_free: bool):
    """Near-one rows get beta = nextafter(1, 0); every mixed row that did not converge at an evaluated point
    is evaluated once more at its final beta. (log-probs, beta, kl)."""
    one_t = torch.ones((), dtype=b.dtype, device=b.device)
    b = torch.where(c.c_near, torch.nextafter(one_t, torch.zeros_like(one_t)), b)
    mixed = c.c_near | c.c_solve
    use_res = conv_any & c.c_solve
    if host_free and not bool((mixed & ~use_res & (b > 0)).any()):  # every mixed row converged: no re-evaluation
        kq, logmu_f = kl_res, logmu_res
    else:
        kq, _, logmu_f = _evaluate(c.logq, c.q, c.dc, b, need_var=False, need_logmu=True, ws=c.ws)
    kq = torch.where(use_res, kl_res, kq)
    logmu_f = torch.where(use_res.unsqueeze(-1), logmu_res, logmu_f)
    pos_b = mixed & (b > 0)
    out = torch.where(pos_b.unsqueeze(-1), logmu_f, c.out)
    beta = torch.where(mixed, b, c.beta)
    kl_all = torch.where(mixed, torch.where(b > 0, kq + c.jump0, 0.0), c.kl_all)
    return out, beta, kl_all
