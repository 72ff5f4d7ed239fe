"""``mixture``: MiniLLM-style teacher-mixed sampling (Gu et al. 2024, arXiv 2306.08543): the next token
is drawn from the ARITHMETIC mixture alpha * pi_T + (1 - alpha) * pi_S (in log space), alpha = 0.2 by
default (MiniLLM's value), optionally annealed linearly to 0 (plain OPD) over ``anneal_steps`` steps.
Used by ``method=mixed_sampling``; the loss is OPD's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trb_exp.blending import kl_divergence
from trb_exp.knobs import bad, ramp
from trb_exp.rules.base import Rule, Sampler, register
from trb_exp.rules.student import StudentSampler


def mixture_logprobs(student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(alpha * pi_T + (1 - alpha) * pi_S) from the two log-prob tensors; a token that both give
    probability 0 (-inf) stays at -inf, and alpha = 0 / 1 return the student / teacher exactly."""
    if alpha <= 0:
        return student_logp
    if alpha >= 1:
        return teacher_logp
    mixed = torch.logaddexp(teacher_logp + math.log(alpha), student_logp + math.log1p(-alpha))
    return torch.where(mixed.isnan(), float("-inf"), mixed)  # (nan_to_num would also turn -inf into a finite value)


@dataclass
class MixtureSampler(Sampler):
    alpha: float
    temperature: float = 1.0
    needs_student: bool = True
    needs_teacher: bool = True

    def __call__(self, student_logits, teacher_logits):
        s = torch.log_softmax(student_logits.float() / self.temperature, -1)
        t = torch.log_softmax(teacher_logits.float() / self.temperature, -1)
        logp = mixture_logprobs(s, t, self.alpha)
        return logp, {"kl_behavior_student": kl_divergence(logp, s)}


@register("mixture")
@dataclass(frozen=True)
class Mixture(Rule):
    alpha: float = 0.2        # the teacher's share of the mixture at step 0 (MiniLLM: 0.2)
    anneal_steps: int = 0     # alpha falls linearly to 0 (plain OPD) by this step; 0 = constant alpha

    def validate(self) -> None:
        if not 0 <= self.alpha <= 1:
            bad("method.alpha", self.alpha, "the teacher's share of the mixture must be in [0, 1] (MiniLLM: 0.2)")
        if self.anneal_steps < 0:
            bad("method.anneal_steps", self.anneal_steps, "the anneal horizon must be >= 0 steps (0 = constant alpha)")

    def alpha_at(self, step: int) -> float:
        return self.alpha if self.anneal_steps == 0 else ramp(step, self.alpha, 0.0, self.anneal_steps)

    def at(self, step, temperature=1.0, generator=None):
        """alpha = 0 is plain student sampling (no teacher in the decode loop)."""
        a = self.alpha_at(step)
        return MixtureSampler(a, temperature=temperature) if a > 0 else StudentSampler(temperature)

    def knobs(self, step: int) -> dict[str, float]:
        return {"mixed/alpha": self.alpha_at(step)}

    def summarize(self, diagnostics, mask, rollout=None) -> dict[str, float]:
        if "kl_behavior_student" not in diagnostics:
            return {}
        kl = diagnostics["kl_behavior_student"][mask]
        return {"mixed/kl_behavior_student_mean": kl.mean().item(), "mixed/kl_behavior_student_max": kl.max().item()}
