"""Pure loss functions for on-policy distillation (tensors in, tensors out).

Conventions
-----------
* ``student_logits``: raw student logits ``[..., V]`` (typically ``[B, T, V]``). Gradients flow into them.
* ``teacher_logprobs``: teacher log-probabilities ``[..., V]`` on the *same* vocabulary. They are treated as
  a fixed target: they are **detached** and **re-normalised** internally with ``log_softmax`` (a no-op for
  proper log-probs, so raw teacher logits are accepted as well).
* Every per-token function returns ``[...]`` (= ``[B, T]``), one value per prefix/position, *unmasked*.
  Reduce with :func:`masked_token_mean`, which is the only place the response mask is applied.
* Names state the KL direction: ``kl_student_teacher_*`` = reverse KL ``KL(pi_S || pi_T)`` (mode seeking, the
  on-policy distillation objective), ``kl_teacher_student_*`` = forward KL ``KL(pi_T || pi_S)``.

Numerics (shared by every function)
-----------------------------------
* Computation happens in ``float32`` at least (bf16/fp16 inputs are upcast, float64 stays float64); outputs
  are float32 (or float64 for float64 inputs).
* Everything is in log space (``log_softmax`` / ``logsumexp``).
* Non-finite logits / log-probs (``-inf`` for masked tokens or vocabulary padding, and also ``nan`` / ``+inf``
  garbage) are replaced *on the input* with ``torch.where`` by a huge negative finite logit (``_NEG_LOGIT``):
  such a token gets probability exactly 0 and receives exactly zero gradient. A row with no finite entry at
  all (e.g. a padding row) becomes a uniform distribution: its value is finite but meaningless and must be
  masked out.
* All log-probabilities (student and teacher) are clamped from below at :data:`LOGPROB_FLOOR` ``= -1000``
  nats. ``exp(-1000) == 0`` even in float64, so floored entries carry exactly zero mass and ``0 * log 0 = 0``
  holds exactly. Consequence: where the student has mass ``p`` but the teacher has probability 0 (-inf), the
  reverse KL -- mathematically ``+inf`` -- is the finite, large, correct-sign ``p * (log p + 1000)``;
  symmetric statement for the forward KL where the teacher has mass on a token the student masks. Genuine
  log-probs below -1000 nats (never seen in practice) would also be clamped and get zero gradient.
* No NaN in values or gradients for any input; positions excluded by the mask in :func:`masked_token_mean`
  contribute exactly zero value and exactly zero gradient, even if their inputs are inf/nan.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "LOGPROB_FLOOR",
    "kl_student_teacher_full",
    "kl_student_teacher_topk",
    "kl_student_teacher_topk_gathered",
    "kl_student_teacher_sampled",
    "kl_student_teacher_sampled_gathered",
    "sampled_kl_estimate_gathered",
    "sampled_kl_estimate",
    "kl_teacher_student_full",
    "generalized_jsd",
    "cross_entropy",
    "geometric_bridge_target",
    "masked_token_mean",
]

#: Lower clamp for every log-probability (nats). exp(LOGPROB_FLOOR) underflows to exactly 0 in float32 and
#: float64, so a floored token has zero mass; penalties for "student mass where the teacher has none" are
#: bounded by ~1000 nats per unit of student mass instead of being +inf.
LOGPROB_FLOOR: float = -1000.0

# Replacement for non-finite logits before normalisation: far below any real logit, far above float32 min.
_NEG_LOGIT: float = -1e9


# --------------------------------------------------------------------------------------------------------
# private helpers
# --------------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _sanitize(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Upcast and replace non-finite entries by ``_NEG_LOGIT`` (zero gradient there)."""
    x = x.to(dtype)
    return torch.where(torch.isfinite(x), x, torch.full((), _NEG_LOGIT, dtype=dtype, device=x.device))


def _logprobs(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Safe ``log_softmax`` over the last dim, clamped at ``LOGPROB_FLOOR``; finite everywhere."""
    return torch.log_softmax(_sanitize(x, dtype), dim=-1).clamp(min=LOGPROB_FLOOR)


def _teacher_logprobs(t: Tensor, dtype: torch.dtype) -> Tensor:
    return _logprobs(t.detach(), dtype)


def _check_same_shape(student_logits: Tensor, teacher: Tensor) -> None:
    if student_logits.shape != teacher.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher {tuple(teacher.shape)} must have the "
            "same shape (same vocabulary; pad/slice the vocab dimension before calling)"
        )


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` for finite (floored) log-probs."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def _sanitize_ids(ids: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Returns (ids clamped into range, bool validity). Out-of-range ids (e.g. -100) are 'ignored'."""
    ids = ids.long()
    valid = (ids >= 0) & (ids < vocab)
    return torch.where(valid, ids, torch.zeros_like(ids)), valid


def _gathered_logprob(logits: Tensor, ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``log_softmax(logits)[ids]`` ``[...]`` (floored) without materialising a full log-softmax, plus id
    validity. Identical to ``_logprobs(logits).gather(ids)``."""
    x = _sanitize(logits, dtype)
    safe_ids, valid = _sanitize_ids(ids, x.shape[-1])
    lp = x.gather(-1, safe_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return lp.clamp(min=LOGPROB_FLOOR), valid


def _check_token_shape(student_logits: Tensor, tokens: Tensor, name: str) -> None:
    if tokens.shape != student_logits.shape[:-1]:
        raise ValueError(f"{name} {tuple(tokens.shape)} must equal student_logits.shape[:-1] "
                         f"{tuple(student_logits.shape[:-1])}")


# --------------------------------------------------------------------------------------------------------
# reverse KL  KL(pi_S || pi_T)
# --------------------------------------------------------------------------------------------------------
def kl_student_teacher_full(student_logits: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Per-prefix reverse KL ``KL(pi_S(.|h) || pi_T(.|h))`` over the full vocabulary, shape ``[...]``.

    ``sum_v pS(v) (log pS(v) - log pT(v))``. Exact (no sampling); gradient flows into ``student_logits``.
    Teacher zero-probability tokens under student mass are charged ``log pS - LOGPROB_FLOOR`` (see module doc).
    """
    _check_same_shape(student_logits, teacher_logprobs)
    dtype = _compute_dtype(student_logits, teacher_logprobs)
    return _kl(_logprobs(student_logits, dtype), _teacher_logprobs(teacher_logprobs, dtype))


def kl_student_teacher_topk_gathered(
    student_logits: Tensor, topk_ids: Tensor, teacher_logprobs_on_ids: Tensor
) -> Tensor:
    """Top-k reverse KL when the support ids and the teacher's log-probs on them are given.

    ``topk_ids`` ``[..., k]`` (distinct ids per position, normally the student's top-k chosen at rollout time)
    and ``teacher_logprobs_on_ids`` ``[..., k]`` = ``log pT(topk_ids)`` (any additive constant per position is
    irrelevant). Both distributions are renormalised on the support ``K``::

        pS_K(i) = pS(i) / sum_{j in K} pS(j),   pT_K likewise,   loss = KL(pS_K || pT_K)

    The student side is computed as ``log_softmax`` of the gathered *logits*, so gradient flows only into the
    ``k`` gathered student logits. Out-of-range ids (e.g. -1 / -100 padding) and non-finite student logits
    are treated as zero-mass support entries. If the teacher gives zero mass to the *whole* support, the
    renormalised teacher is undefined and becomes uniform on the support (value then meaningless).
    """
    if topk_ids.shape != teacher_logprobs_on_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and teacher_logprobs_on_ids "
                         f"{tuple(teacher_logprobs_on_ids.shape)} must have the same shape")
    if topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"topk_ids leading dims {tuple(topk_ids.shape[:-1])} must equal student_logits "
                         f"leading dims {tuple(student_logits.shape[:-1])}")
    dtype = _compute_dtype(student_logits, teacher_logprobs_on_ids)
    safe_ids, valid = _sanitize_ids(topk_ids, student_logits.shape[-1])
    s = student_logits.gather(-1, safe_ids).to(dtype)  # gather first: never upcasts the full [..., V]
    s = torch.where(valid, s, torch.full((), -math.inf, dtype=dtype, device=s.device))  # sanitised below
    return _kl(_logprobs(s, dtype), _teacher_logprobs(teacher_logprobs_on_ids, dtype))


def kl_student_teacher_topk(student_logits: Tensor, teacher_logprobs: Tensor, k: int = 16) -> Tensor:
    """Top-k reverse KL estimator (Li et al., top-k on-policy distillation), shape ``[...]``.

    Support = the student's ``k`` highest-logit tokens at each prefix (chosen with ``torch.topk`` on detached
    logits: no gradient through the selection); both distributions are renormalised on that support and
    ``KL(pS_k || pT_k)`` is returned (see :func:`kl_student_teacher_topk_gathered`). For ``k >= V`` the support
    is the whole vocabulary and the result equals :func:`kl_student_teacher_full`. For ``k < V`` it is a
    biased, lower-variance surrogate: tokens outside the support get no gradient.
    """
    _check_same_shape(student_logits, teacher_logprobs)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), student_logits.shape[-1])
    with torch.no_grad():  # selection only; nan (garbage rows) must not win the top-k
        ids = torch.nan_to_num(student_logits.detach(), nan=-math.inf).topk(k, dim=-1).indices
    return kl_student_teacher_topk_gathered(student_logits, ids, teacher_logprobs.detach().gather(-1, ids))


def kl_student_teacher_sampled(student_logits: Tensor, teacher_logprobs: Tensor, tokens: Tensor) -> Tensor:
    """One-sample reverse-KL **policy-gradient surrogate** on the rollout tokens, shape ``[...]``.

    ``tokens`` ``[...]`` is the token ``y`` sampled at each position. Per-token loss::

        sg(log pS(y) - log pT(y)) * log pS(y)

    (Thinking Machines' on-policy distillation: REINFORCE with per-token advantage
    ``-(log pS(y) - log pT(y))``.) Its gradient is ``(log pS(y) - log pT(y)) * grad log pS(y)``, whose
    expectation under ``y ~ pS`` is exactly ``grad KL(pS || pT)``. **Its VALUE is a surrogate, not a KL** (it
    is not even sign-definite); log :func:`sampled_kl_estimate` instead. Tokens are assumed to be sampled
    from the student (on-policy); otherwise importance weights are the caller's business.

    Out-of-range token ids (e.g. ``-100``) give 0. A token to which the student assigns zero probability
    (-inf logit) gives ``log pS(y) = LOGPROB_FLOOR`` with zero gradient.
    """
    _check_same_shape(student_logits, teacher_logprobs)
    _check_token_shape(student_logits, tokens, "tokens")
    dtype = _compute_dtype(student_logits, teacher_logprobs)
    lps, valid = _gathered_logprob(student_logits, tokens, dtype)
    lpt, _ = _gathered_logprob(teacher_logprobs.detach(), tokens, dtype)
    loss = (lps - lpt).detach() * lps
    return torch.where(valid, loss, torch.zeros_like(loss))


def kl_student_teacher_sampled_gathered(student_logits: Tensor, tokens: Tensor, teacher_token_logprobs: Tensor) -> Tensor:
    """:func:`kl_student_teacher_sampled` when only ``log pT(tokens)`` ``[...]`` is kept (O(1) per position):
    the same value and gradient, ``sg(log pS(y) - log pT(y)) * log pS(y)``."""
    _check_token_shape(student_logits, tokens, "tokens")
    dtype = _compute_dtype(student_logits, teacher_token_logprobs)
    lps, valid = _gathered_logprob(student_logits, tokens, dtype)
    lpt = _sanitize(teacher_token_logprobs.detach(), dtype).clamp(min=LOGPROB_FLOOR)
    loss = (lps - lpt).detach() * lps
    return torch.where(valid, loss, torch.zeros_like(loss))


def sampled_kl_estimate(student_logits: Tensor, teacher_logprobs: Tensor, tokens: Tensor) -> Tensor:
    """``log pS(y) - log pT(y)`` on the sampled tokens (no gradient), shape ``[...]``, for logging.

    For ``y ~ pS`` its expectation is ``KL(pS || pT)`` (the classic "k1" single-sample estimator; individual
    values can be negative). Out-of-range ids give 0.
    """
    _check_same_shape(student_logits, teacher_logprobs)
    _check_token_shape(student_logits, tokens, "tokens")
    with torch.no_grad():
        dtype = _compute_dtype(student_logits, teacher_logprobs)
        lps, valid = _gathered_logprob(student_logits.detach(), tokens, dtype)
        lpt, _ = _gathered_logprob(teacher_logprobs.detach(), tokens, dtype)
        est = lps - lpt
        return torch.where(valid, est, torch.zeros_like(est))


def sampled_kl_estimate_gathered(student_logits: Tensor, tokens: Tensor, teacher_token_logprobs: Tensor) -> Tensor:
    """:func:`sampled_kl_estimate` from ``log pT(tokens)`` alone."""
    with torch.no_grad():
        dtype = _compute_dtype(student_logits, teacher_token_logprobs)
        lps, valid = _gathered_logprob(student_logits.detach(), tokens, dtype)
        est = lps - _sanitize(teacher_token_logprobs, dtype).clamp(min=LOGPROB_FLOOR)
        return torch.where(valid, est, torch.zeros_like(est))


# --------------------------------------------------------------------------------------------------------
# forward KL, generalised JSD, cross-entropy
# --------------------------------------------------------------------------------------------------------
def kl_teacher_student_full(student_logits: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Per-prefix forward KL ``KL(pi_T(.|h) || pi_S(.|h))`` over the full vocabulary, shape ``[...]``.

    ``sum_v pT(v) (log pT(v) - log pS(v))`` (mode covering; = cross-entropy to the teacher minus its entropy).
    Teacher mass on a token the student masks (-inf logit) is charged ``log pT - LOGPROB_FLOOR``.
    """
    _check_same_shape(student_logits, teacher_logprobs)
    dtype = _compute_dtype(student_logits, teacher_logprobs)
    return _kl(_teacher_logprobs(teacher_logprobs, dtype), _logprobs(student_logits, dtype))


def generalized_jsd(student_logits: Tensor, teacher_logprobs: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), *scaled*, shape ``[...]``.

    With the mixture ``M = beta * pT + (1 - beta) * pS`` (computed in log space with ``logaddexp``), TRL's
    ``GKDTrainer.generalized_jsd_loss`` value is ``J_beta = beta * KL(pT || M) + (1 - beta) * KL(pS || M)``.
    This project's convention returns::

        beta == 0        ->  KL(pT || pS)                      (forward KL, exact)
        0 < beta < 1     ->  J_beta / (beta * (1 - beta))      (TRL's value, rescaled)
        beta == 1        ->  KL(pS || pT)                      (reverse KL, exact)

    ``J_beta`` vanishes at both endpoints; the rescaled version is continuous on ``[0, 1]`` because
    ``J_beta / beta -> KL(pT||pS)`` as ``beta -> 0`` and ``J_beta / (1-beta) -> KL(pS||pT)`` as ``beta -> 1``,
    so the endpoints are the two KLs and are special-cased exactly. (Same endpoint orientation as TRL: small
    beta = forward KL, large beta = reverse KL.) At ``beta = 0.5`` the value is ``4 * JSD`` (<= 4 log 2).
    Very close to an endpoint (``beta`` or ``1-beta`` < ~1e-4) float32 cancellation makes the interior formula
    noisy; use the endpoint instead.
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl_teacher_student_full(student_logits, teacher_logprobs)
    if beta == 1.0:
        return kl_student_teacher_full(student_logits, teacher_logprobs)
    _check_same_shape(student_logits, teacher_logprobs)
    dtype = _compute_dtype(student_logits, teacher_logprobs)
    lps = _logprobs(student_logits, dtype)
    lpt = _teacher_logprobs(teacher_logprobs, dtype)
    log_m = torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))
    jsd = beta * _kl(lpt, log_m) + (1.0 - beta) * _kl(lps, log_m)
    return jsd / (beta * (1.0 - beta))


def cross_entropy(student_logits: Tensor, target_ids: Tensor) -> Tensor:
    """``-log pS(target)`` per position, shape ``[...]``.

    Out-of-range targets (``-100`` ignore index, padding ids) give 0 with no gradient. A target the student
    masks (-inf logit) gives ``-LOGPROB_FLOOR`` with zero gradient.
    """
    _check_token_shape(student_logits, target_ids, "target_ids")
    lps, valid = _gathered_logprob(student_logits, target_ids, _compute_dtype(student_logits))
    return torch.where(valid, -lps, torch.zeros_like(lps))


# --------------------------------------------------------------------------------------------------------
# geometric bridge target (Veto)
# --------------------------------------------------------------------------------------------------------
def geometric_bridge_target(
    teacher_logprobs: Tensor, student_logits: Tensor, b: Union[float, Tensor]
) -> Tensor:
    """Log-probs of the geometric bridge ``q_b ∝ pi_T^b * sg(pi_S)^(1-b)``, shape ``[..., V]``.

    ``log q_b = log_softmax(b * log pT + (1 - b) * sg(log pS))``; ``b = 1`` gives ``pi_T``, ``b = 0`` gives
    ``pi_S``. The student is **detached**: no gradient flows to the student through the target (gradient
    does flow into ``b`` if it requires grad). ``b`` is a Python scalar or a tensor broadcastable against
    ``[..., V]``; a tensor whose shape equals the leading dims ``[...]`` (e.g. a per-position ``[B, T]``
    schedule) is unsqueezed automatically. Output is floored at ``LOGPROB_FLOOR`` like every log-prob here
    (tokens impossible under either endpoint get ~``LOGPROB_FLOOR`` rather than -inf), so it can be passed
    directly as ``teacher_logprobs`` to the KL functions.
    """
    _check_same_shape(student_logits, teacher_logprobs)
    dtype = _compute_dtype(student_logits, teacher_logprobs)
    lpt = _teacher_logprobs(teacher_logprobs, dtype)
    lps = _logprobs(student_logits.detach(), dtype)
    if isinstance(b, Tensor):
        b = b.to(device=lpt.device, dtype=dtype)
        if b.dim() > 0 and b.dim() == lpt.dim() - 1 and tuple(b.shape) == tuple(lpt.shape[:-1]):
            b = b.unsqueeze(-1)
    return torch.log_softmax(b * lpt + (1 - b) * lps, dim=-1).clamp(min=LOGPROB_FLOOR)


# --------------------------------------------------------------------------------------------------------
# reduction
# --------------------------------------------------------------------------------------------------------
def masked_token_mean(
    per_token: Tensor, mask: Tensor, num_tokens: Optional[Union[int, float, Tensor]] = None
) -> Tensor:
    """``sum(per_token * mask) / num_tokens`` (scalar); ``num_tokens`` defaults to ``mask.sum()``.

    Gradient accumulation: pass ``num_tokens`` = number of response tokens in the WHOLE optimizer batch
    (all micro-batches) and *sum* the micro-batch losses/gradients (no further division). The result then
    equals, in value and gradient, one big-batch token mean -- unlike averaging per-micro-batch means, which
    over-weights tokens of short micro-batches. (Under DDP, which averages gradients over ``R`` ranks, pass
    ``global_tokens / R``.)

    ``mask`` is bool or 0/1 (fractional weights are multiplied in). Masked positions are removed with
    ``torch.where`` before any arithmetic, so they contribute exactly zero value and zero gradient even if
    ``per_token`` is inf/nan there. ``num_tokens == 0`` returns a 0 that is still attached to the graph
    (backward gives zero gradients, no NaN).
    """
    if mask.shape != per_token.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of per_token {tuple(per_token.shape)}")
    keep = mask != 0
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    selected = torch.where(keep, per_token, zero)
    if mask.dtype != torch.bool:
        selected = selected * mask.to(per_token.dtype)
    total = selected.sum()
    if num_tokens is None:
        num_tokens = mask.to(per_token.dtype).sum()
    if isinstance(num_tokens, Tensor):
        n = num_tokens.to(device=total.device, dtype=total.dtype)
        pos = n > 0
        return torch.where(pos, total / torch.where(pos, n, torch.ones_like(n)), total * 0.0)
    if num_tokens <= 0:
        return total * 0.0
    return total / float(num_tokens)
