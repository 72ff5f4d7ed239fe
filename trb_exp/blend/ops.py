"""The pure pieces of TRB's behaviour policy (see ``trb_exp.blending``): the solver's result type, the
NaN-free log-softmax, the geometric mixture, KL divergences and the EOS merge."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor


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
