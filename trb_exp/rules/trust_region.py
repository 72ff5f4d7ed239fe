"""``trust_region``: TRB's behaviour policy mu_b ∝ pi_S^(1-b) pi_T^b, the largest b with
KL(mu_b||pi_S) <= eps_k, eps_k from the ``schedule`` group (``trb``: annealed to 0 = plain OPD;
``fixed_blend``: ``schedule=constant``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from trb_exp.blending import kl_divergence, trust_region_blend, trust_region_blend_device
from trb_exp.knobs import NOT_A_KNOB
from trb_exp.rules.base import Rule, Sampler, register
from trb_exp.rules.student import StudentSampler
from trb_exp.schedules import Schedule


@dataclass
class TrustRegionSampler(Sampler):
    """``budget='absolute'``: eps nats per token (the paper's knob); ``budget='relative'``:
    eps = rho * KL(pi_T||pi_S) at each prefix, ``rho = eps`` in [0, 1]."""

    eps: float
    budget: str = "absolute"
    temperature: float = 1.0
    tol: float = 1e-6
    solver: str = "exact"  # exact: blending.trust_region_blend; device: its sync-free twin (static engine)
    max_iter: int = 30
    fixed_iters: bool = False  # device solver: exactly max_iter iterations (no host read at all)
    needs_student: bool = True
    needs_teacher: bool = True

    def for_static_engine(self, solver_iters: int | None) -> TrustRegionSampler:
        return dataclasses.replace(self, solver="device", max_iter=solver_iters or self.max_iter,
                                   fixed_iters=solver_iters is not None)

    def __call__(self, student_logits, teacher_logits):
        s = student_logits.float() / self.temperature
        t = teacher_logits.float() / self.temperature
        if self.budget == "relative":
            gap = kl_divergence(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
            eps = self.eps * torch.nan_to_num(gap, posinf=1e4)
        else:
            eps = torch.full(s.shape[:-1], float(self.eps), device=s.device)
        if self.solver == "device":
            res = trust_region_blend_device(s, t, eps, tol=self.tol, max_iter=self.max_iter,
                                            fixed_iters=self.fixed_iters)
        else:
            res = trust_region_blend(s, t, eps, tol=self.tol, max_iter=self.max_iter)
        diag = {
            "eps": eps,
            "beta": res.beta,
            "kl_behavior_student": res.kl,
            "solver_iters": res.iters.float(),
        }
        return res.logprobs, diag


@register("trust_region")
@dataclass(frozen=True)
class TrustRegion(Rule):
    budget_schedule: Schedule | None = field(default=None, metadata=NOT_A_KNOB)

    def with_schedule(self, schedule) -> TrustRegion:
        return dataclasses.replace(self, budget_schedule=None if schedule is None else schedule.attach_controller())

    @property
    def schedule(self) -> Schedule | None:
        return self.budget_schedule

    def budget(self, step: int) -> float:
        """eps_k of step ``step`` (0 without a schedule)."""
        return 0.0 if self.budget_schedule is None else self.budget_schedule(step)

    def at(self, step, temperature=1.0, generator=None):
        """A zero budget falls back to plain student sampling, so TRB after warmup costs exactly what
        OPD costs (no teacher in the decode loop)."""
        eps = self.budget(step)
        if eps > 0:
            return TrustRegionSampler(eps, budget=self.budget_schedule.budget, temperature=temperature)
        return StudentSampler(temperature)

    def knobs(self, step: int) -> dict[str, float]:
        return {"trb/eps": self.budget(step)}

    def observe(self, gap: float, reward: float) -> None:
        if self.budget_schedule is not None:
            self.budget_schedule.observe(gap, reward)

    def summarize(self, diagnostics, mask, rollout=None) -> dict[str, float]:
        d = diagnostics
        if "beta" not in d:  # a zero budget: the student sampled alone
            return {"trb/beta_mean": 0.0, "trb/frac_beta_pos": 0.0, "trb/kl_behavior_student_mean": 0.0}
        beta, kl, eps = d["beta"][mask], d["kl_behavior_student"][mask], d["eps"][mask]
        return {
            "trb/eps_mean": eps.mean().item(),
            "trb/beta_mean": beta.mean().item(),
            "trb/frac_beta_pos": (beta > 0).float().mean().item(),
            "trb/frac_beta_one": (beta >= 1).float().mean().item(),
            "trb/kl_behavior_student_mean": kl.mean().item(),
            "trb/kl_behavior_student_max": kl.max().item(),
            "trb/kl_behavior_student_seq_sum": (d["kl_behavior_student"] * mask).sum(1).mean().item(),
            "trb/kl_excess_max": (kl - eps).max().item(),
            "trb/solver_iters_mean": d["solver_iters"][mask].mean().item(),
            "trb/solver_iters_max": d["solver_iters"][mask].max().item(),
            "trb/solver_share": 0.0 if rollout is None else rollout.rule_s / max(rollout.decode_s, 1e-9),
        }
