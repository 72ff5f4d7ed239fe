"""The inner evaluation shared by TRB's exact and sync-free solvers: K(b) = KL(mu_b || q), Var_mu[d] and
log mu_b in one pass over the vocabulary (see ``trb_exp.blending`` for the derivation)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

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
