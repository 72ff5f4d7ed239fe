"""The student's losses, by name (``method.loss``), with their knobs and targets; the maths are the
pure functions of ``losses.py``.

    reverse_kl   per-prefix KL(pi_S || q)   (OPD), estimator full | topk | sampled
    forward_kl   per-prefix KL(q || pi_S)   (offline KD on teacher rollouts, Veto's forward variant)
    ce           cross-entropy on the rollout's tokens (offline KD)

The target q is the teacher pi_T, or Veto's geometric bridge q_b ∝ pi_T^b sg(pi_S)^(1-b) while b < 1
(b from ``b_start`` at step 0 to 1 at step ``method.K``). A loss is a frozen dataclass of its knobs
(defaults written once, checked by ``validate``); ``@register_loss`` makes a new one selectable.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from trb_exp import losses
from trb_exp.knobs import NOT_A_KNOB, Registry, bad, knobs_from, ramp

LOSSES = Registry("method.loss")
register_loss = LOSSES.register
ESTIMATORS = ("full", "topk", "sampled")


def loss_class(name: str) -> type[Loss]:
    return LOSSES.lookup(name)


@dataclass(frozen=True)
class Loss(abc.ABC):
    name: ClassVar[str] = ""
    needs_teacher_logprobs: ClassVar[bool] = True
    estimator: str = "topk"  # reverse_kl's estimator: full | topk | sampled (unused by forward_kl and ce)
    topk: int = 16           # support of the topk estimator (and of rollout.teacher_stats=topk)
    b_start: float = 1.0     # Veto's bridge exponent at step 0, annealed to 1 (the teacher) by step method.K
    horizon: int = field(default=0, metadata=NOT_A_KNOB)  # method.K

    @classmethod
    def from_cfg(cls, method_cfg, horizon: int = 0, rule=None) -> Loss:
        loss = cls(**knobs_from(cls, method_cfg, "method"), horizon=horizon)
        loss.validate(rule)
        return loss

    def validate(self, rule=None) -> None:
        if self.estimator not in ESTIMATORS:
            bad("method.estimator", self.estimator, f"choose one of {', '.join(ESTIMATORS)}")
        if self.topk < 1:
            bad("method.topk", self.topk, "must be >= 1")
        if not 0 < self.b_start <= 1:
            bad("method.b_start", self.b_start, "the bridge exponent must be in (0, 1] (1 = the teacher, plain OPD)")

    # -- the target -----------------------------------------------------------------------------
    def bridge_b(self, step: int) -> float:
        """Veto's bridge exponent b at ``step`` (1 = the teacher itself, i.e. no bridge)."""
        return ramp(step, self.b_start, 1.0, self.horizon)

    def target_logprobs(self, student_logits: Tensor, teacher_logprobs: Tensor, step: int = 0) -> Tensor:
        """pi_T, or the geometric bridge ``q_b ∝ pi_T^b sg(pi_S)^(1-b)`` while b < 1."""
        b = self.bridge_b(step)
        if b >= 1.0:
            return teacher_logprobs
        return losses.geometric_bridge_target(teacher_logprobs, student_logits, b)

    def knobs(self, step: int) -> dict[str, float]:
        return {"veto/b": self.bridge_b(step)} if self.b_start < 1 else {}

    # -- the loss -------------------------------------------------------------------------------
    @abc.abstractmethod
    def per_token(self, student_logits: Tensor, teacher_logprobs: Tensor | None, tokens: Tensor,
                  step: int = 0) -> Tensor:
        """[B, T] per-token loss at step ``step``; reduce with ``losses.masked_token_mean``."""

    @property
    def sparse_ok(self) -> bool:
        """Whether the loss needs the teacher only on the student's top-k support and the sampled token
        (``rollout.teacher_stats=topk``)."""
        return False

    @property
    def logs_kl_estimate(self) -> bool:
        """Whether the loss value is a surrogate, logged with a KL estimate (``train/kl_estimate``)."""
        return False


@register_loss("reverse_kl")
@dataclass(frozen=True)
class ReverseKL(Loss):
    def validate(self, rule=None) -> None:
        super().validate(rule)
        if self.estimator == "sampled" and rule is not None and not rule.on_policy:
            bad("method.estimator", self.estimator, "the sampled estimator needs student rollouts")

    def per_token(self, student_logits, teacher_logprobs, tokens, step=0) -> Tensor:
        target = self.target_logprobs(student_logits, teacher_logprobs, step)
        if self.estimator == "full":
            return losses.kl_student_teacher_full(student_logits, target)
        if self.estimator == "topk":
            return losses.kl_student_teacher_topk(student_logits, target, k=self.topk)
        return losses.kl_student_teacher_sampled(student_logits, target, tokens)

    @property
    def sparse_ok(self) -> bool:
        return self.estimator in ("topk", "sampled") and self.b_start >= 1.0

    def per_token_sparse(self, student_logits: Tensor, topk_ids: Tensor | None, teacher_on_ids: Tensor | None,
                         tokens: Tensor, teacher_on_tokens: Tensor | None) -> Tensor:
        """[B, T] from O(k) teacher statistics (``sparse_ok``): the same values and gradients as
        :meth:`per_token` with the full teacher log-probs on the same support."""
        if self.estimator == "topk":
            return losses.kl_student_teacher_topk_gathered(student_logits, topk_ids, teacher_on_ids)
        return losses.kl_student_teacher_sampled_gathered(student_logits, tokens, teacher_on_tokens)

    @property
    def logs_kl_estimate(self) -> bool:
        """The sampled estimator's value is a policy-gradient surrogate: log ``log pS(y) - log q(y)``."""
        return self.estimator == "sampled"

    def kl_estimate(self, student_logits: Tensor, teacher_logprobs: Tensor, tokens: Tensor, step: int = 0) -> Tensor:
        """[B, T] per-token ``log pS(y) - log q(y)`` against the loss target q (no gradient)."""
        target = self.target_logprobs(student_logits, teacher_logprobs, step)
        return losses.sampled_kl_estimate(student_logits, target, tokens)


@register_loss("forward_kl")
@dataclass(frozen=True)
class ForwardKL(Loss):
    def per_token(self, student_logits, teacher_logprobs, tokens, step=0) -> Tensor:
        return losses.kl_teacher_student_full(student_logits, self.target_logprobs(student_logits, teacher_logprobs, step))


@register_loss("ce")
@dataclass(frozen=True)
class CrossEntropy(Loss):
    needs_teacher_logprobs: ClassVar[bool] = False

    def validate(self, rule=None) -> None:
        super().validate(rule)
        if self.b_start < 1:
            bad("method.b_start", self.b_start, "the bridge target needs a KL loss (reverse_kl or forward_kl), not ce")

    def per_token(self, student_logits, teacher_logprobs, tokens, step=0) -> Tensor:
        return losses.cross_entropy(student_logits, tokens)
