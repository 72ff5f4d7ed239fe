"""A method = which behaviour rule produces the rollouts at step k, and which loss the student
minimises on them. Every method is one YAML file in ``conf/method/`` read by ``Method.from_cfg``.

    opd         student rollouts;                 reverse KL(pi_S||pi_T) per prefix
    trb         trust-region blended rollouts;    reverse KL(pi_S||pi_T) per prefix
                (budget eps_k from the schedule; 0 after warmup = plain OPD)
    offline_kd  teacher rollouts (the student never samples); cross-entropy or forward KL
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from trb_exp import losses
from trb_exp.config import ConfigError
from trb_exp.rollout import StudentRule, TeacherRule, TrustRegionRule
from trb_exp.schedules import SCHEDULES, budget_at

ROLLOUTS = ("student", "trust_region", "teacher")
LOSSES = ("reverse_kl", "forward_kl", "ce")
ESTIMATORS = ("full", "topk", "sampled")
BUDGETS = ("absolute", "relative")


@dataclass(frozen=True)
class Schedule:
    name: str
    eps0: float
    warmup_steps: int
    budget: str = "absolute"
    final_ratio: float = 0.01

    def __call__(self, step: int) -> float:
        return budget_at(step, self.name, self.eps0, self.warmup_steps, self.final_ratio)


@dataclass(frozen=True)
class Method:
    name: str
    rollout: str
    loss: str
    estimator: str
    topk: int
    schedule: Schedule

    @classmethod
    def from_cfg(cls, method_cfg, schedule_cfg) -> "Method":
        m = cls(
            name=str(method_cfg.name),
            rollout=str(method_cfg.rollout),
            loss=str(method_cfg.loss),
            estimator=str(method_cfg.get("estimator", "topk")),
            topk=int(method_cfg.get("topk", 16)),
            schedule=Schedule(
                name=str(schedule_cfg.name),
                eps0=float(schedule_cfg.eps0),
                warmup_steps=int(schedule_cfg.warmup_steps),
                budget=str(schedule_cfg.get("budget", "absolute")),
                final_ratio=float(schedule_cfg.get("final_ratio", 0.01)),
            ),
        )
        m.validate()
        return m

    def validate(self) -> None:
        def bad(field, value, fix):
            raise ConfigError(f"{field}={value!r}: {fix}")

        if self.rollout not in ROLLOUTS:
            bad("method.rollout", self.rollout, f"choose one of {', '.join(ROLLOUTS)}")
        if self.loss not in LOSSES:
            bad("method.loss", self.loss, f"choose one of {', '.join(LOSSES)}")
        if self.estimator not in ESTIMATORS:
            bad("method.estimator", self.estimator, f"choose one of {', '.join(ESTIMATORS)}")
        if self.topk < 1:
            bad("method.topk", self.topk, "must be >= 1")
        s = self.schedule
        if s.name not in SCHEDULES:
            bad("schedule.name", s.name, f"choose one of {', '.join(SCHEDULES)}")
        if not s.eps0 >= 0:
            bad("schedule.eps0", s.eps0, "a KL budget must be >= 0 (0 = plain OPD)")
        if s.warmup_steps < 1 and s.name not in ("constant", "none"):
            bad("schedule.warmup_steps", s.warmup_steps, "the warmup horizon K must be >= 1")
        if s.budget not in BUDGETS:
            bad("schedule.budget", s.budget, f"choose one of {', '.join(BUDGETS)}")
        if s.budget == "relative" and s.eps0 > 1:
            bad("schedule.eps0", s.eps0, "a relative budget is a fraction of KL(pi_T||pi_S): use a value in [0, 1]")
        if self.rollout == "teacher" and self.loss == "reverse_kl" and self.estimator == "sampled":
            bad("method.estimator", self.estimator, "the sampled estimator needs student rollouts")

    # -- rollouts -------------------------------------------------------------------------------
    def budget(self, step: int) -> float:
        return self.schedule(step) if self.rollout == "trust_region" else 0.0

    def rule(self, step: int, temperature: float = 1.0):
        """The behaviour rule at training step ``step``. A zero budget falls back to plain student
        sampling, so TRB after warmup costs exactly what OPD costs (no teacher in the decode loop)."""
        if self.rollout == "teacher":
            return TeacherRule(temperature)
        eps = self.budget(step)
        if self.rollout == "trust_region" and eps > 0:
            return TrustRegionRule(eps, budget=self.schedule.budget, temperature=temperature)
        return StudentRule(temperature)

    # -- loss -----------------------------------------------------------------------------------
    @property
    def needs_teacher_logprobs(self) -> bool:
        return self.loss != "ce"

    def per_token_loss(self, student_logits: Tensor, teacher_logprobs: Tensor | None, tokens: Tensor) -> Tensor:
        """[B, T] per-token loss; reduce with ``losses.masked_token_mean``."""
        if self.loss == "ce":
            return losses.cross_entropy(student_logits, tokens)
        if self.loss == "forward_kl":
            return losses.kl_teacher_student_full(student_logits, teacher_logprobs)
        if self.estimator == "full":
            return losses.kl_student_teacher_full(student_logits, teacher_logprobs)
        if self.estimator == "topk":
            return losses.kl_student_teacher_topk(student_logits, teacher_logprobs, k=self.topk)
        return losses.kl_student_teacher_sampled(student_logits, teacher_logprobs, tokens)
