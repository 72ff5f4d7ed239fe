"""KL-budget schedules: pure functions of the training step.

Every schedule maps the step ``k`` (0-based) to a budget ``eps_k >= 0`` from its initial value
``eps0`` and its horizon ``K = warmup_steps``. All but ``constant`` reach 0 at step ``K`` and stay
there, after which TRB is plain OPD. With ``budget: relative`` the same value is read as the
fraction ``rho_k`` of the per-prefix teacher-student gap ``KL(pi_T||pi_S)``.

    linear       eps0 * (1 - k/K)                     (the paper)
    cosine       eps0 * (1 + cos(pi k/K)) / 2
    exponential  eps0 * final_ratio ** (k/K)          (geometric decay, then 0 at K)
    step         eps0                                  (full budget, then 0 at K)
    constant     eps0 for every step, K unused         (fixed-eps blending, the paper's ablation)
    none         0                                     (plain OPD)

Two *adaptive* schedules need no horizon K: the budget follows what the run measures, and reaches 0
(plain OPD, at OPD's cost) by itself. Each is a pure function of the run's history of observations
(``adaptive_budgets``), wrapped in a small stateful ``AdaptiveBudget`` that the trainer feeds one
observation per step and that saves/restores its state (resumable runs).

    gap          eps_{k+1} = eps0 * clip((g_k/g_0 - h) / (1 - h), 0, 1), never increasing: the budget
                 follows the distillation gap g (the step's per-token reverse-KL loss, EMA-smoothed
                 with decay 0.9) from its first value g_0 down to the hand-over fraction h
                 (``handover``, 0.5): plain OPD once the smoothed gap has fallen to h * g_0.
                 Knob: eps0 (K is replaced by the measured gap).
    reward       a controller on the reward r_k of the step's (blended) rollouts: eps_{k+1} =
                 eps_k * 2 ** ((r* - r_k) / r*), capped at 4 * eps0 (1 for a relative budget),
                 starting at eps0: doubled when the rollouts solve nothing, halved at twice the
                 target. Once it has fallen below eps0 / 50 the (almost unblended) student's own
                 rollouts reach the target r* (``target_reward``): hand-over, 0 for good.
                 Knob: target_reward (eps0 only sets where the controller starts).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from trb_exp.config import ConfigError
from trb_exp.knobs import NOT_A_KNOB, bad, knobs_from

SCHEDULES = ("linear", "cosine", "exponential", "step", "constant", "none", "gap", "reward")
ADAPTIVE = ("gap", "reward")
GAP_EMA_DECAY = 0.9     # smoothing of the measured gap (the per-step loss is noisy)
REWARD_EPS_CAP = 4.0    # the reward controller never exceeds 4 * eps0
REWARD_HANDOVER = 0.02  # ... and hands over to plain OPD below eps0 / 50
HORIZON = ("linear", "cosine", "exponential", "step")  # the schedules that read warmup_steps (K)
BUDGETS = ("absolute", "relative")


def check_eps0(eps0, *, relative: bool = False, finite: bool = False, field: str = "schedule.eps0",
               error: type[ValueError] = ConfigError) -> float:
    """The one check of a KL budget ``eps0`` (the schedule group, the budget functions, TRL's ``TRBConfig``): a
    number >= 0 (finite where ``finite``: the adaptive controllers), at most 1 for a ``relative`` budget.
    Raises ``error`` with one line naming ``field``."""
    if not (isinstance(eps0, numbers.Real) and not isinstance(eps0, bool) and eps0 >= 0
            and (not finite or math.isfinite(eps0))):
        raise error(f"{field}={eps0!r}: a KL budget must be {'a finite number ' if finite else ''}>= 0 (0 = plain OPD)")
    if relative and eps0 > 1:
        raise error(f"{field}={eps0!r}: a relative budget is a fraction of KL(pi_T||pi_S): use a value in [0, 1]")
    return float(eps0)


def check_controller(handover: float, target_reward: float) -> None:
    """The one check of the adaptive controllers' knobs (the schedule group and ``AdaptiveBudget``)."""
    if not 0 <= handover < 1:
        bad("schedule.handover", handover, "the hand-over fraction of the initial gap must be in [0, 1)")
    if not 0 < target_reward <= 1:
        bad("schedule.target_reward", target_reward, "a target mean reward must be in (0, 1]")


def budget_at(step: int, name: str, eps0: float, warmup_steps: int, final_ratio: float = 0.01) -> float:
    """The budget eps_k of training step ``step`` under schedule ``name``."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name={name!r}: choose one of {', '.join(SCHEDULES)}")
    if name in ADAPTIVE:
        raise ValueError(f"schedule.name={name!r} is adaptive: its budget depends on the run's history, "
                         "use AdaptiveBudget (or adaptive_budgets for a scripted history)")
    check_eps0(eps0)
    if name == "none":
        return 0.0
    if name == "constant":
        return float(eps0)
    if step >= warmup_steps:
        return 0.0
    frac = step / warmup_steps
    if name == "linear":
        return eps0 * (1.0 - frac)
    if name == "cosine":
        return eps0 * 0.5 * (1.0 + math.cos(math.pi * frac))
    if name == "exponential":
        return eps0 * final_ratio**frac
    return float(eps0)  # step


def adaptive_budgets(name: str, eps0: float, gaps, rewards, *, handover: float = 0.5, target_reward: float = 0.25,
                     relative: bool = False) -> list[float]:
    """The budgets eps_0 .. eps_n of an adaptive schedule, given the observations of steps 0 .. n-1:
    ``gaps[k]`` (the step's mean per-token reverse-KL loss) and ``rewards[k]`` (the mean reward of its
    rollouts). A pure function of the history: the trainer's ``AdaptiveBudget`` gives the same numbers."""
    ctl = AdaptiveBudget(name, eps0, handover=handover, target_reward=target_reward, relative=relative)
    out = [ctl.eps]
    for g, r in zip(gaps, rewards, strict=True):
        ctl.observe(g, r)
        out.append(ctl.eps)
    return out


class AdaptiveBudget:
    """The budget of an adaptive schedule (``gap`` or ``reward``), as state: ``eps`` is the budget
    of the next step; ``observe(gap, reward)`` takes the step's measurements and moves it. Zero is
    absorbing (the hand-over to plain OPD). ``state_dict``/``load_state_dict`` hold plain floats."""

    def __init__(self, name: str, eps0: float, *, handover: float = 0.5, target_reward: float = 0.25,
                 relative: bool = False):
        if name not in ADAPTIVE:
            raise ValueError(f"schedule.name={name!r}: the adaptive schedules are {', '.join(ADAPTIVE)}")
        check_eps0(eps0, finite=True)
        check_controller(handover, target_reward)
        self.name, self.eps0, self.handover, self.target_reward = name, float(eps0), handover, target_reward
        self.cap = min(REWARD_EPS_CAP * self.eps0, 1.0) if relative else REWARD_EPS_CAP * self.eps0
        self.eps = float(eps0)
        self.gap0: float | None = None  # first measured gap (gap rule)
        self.gap_ema: float | None = None
        self.steps = 0  # observations taken

    def observe(self, gap: float, reward: float) -> float:
        """Take step k's measurements; returns the budget of step k+1."""
        self.steps += 1
        if self.name == "gap":
            if not math.isfinite(gap):
                raise ValueError(f"gap schedule: step {self.steps - 1} measured a non-finite gap {gap}")
            if self.gap0 is None:
                self.gap0 = self.gap_ema = float(gap)
            else:
                self.gap_ema = GAP_EMA_DECAY * self.gap_ema + (1 - GAP_EMA_DECAY) * float(gap)
            frac = 0.0 if self.gap0 <= 0 else (self.gap_ema / self.gap0 - self.handover) / (1 - self.handover)
            self.eps = min(self.eps, self.eps0 * min(1.0, max(0.0, frac)))
        elif self.eps > 0:  # reward controller; 0 is absorbing
            r = self.target_reward
            eps = min(self.cap, self.eps * 2.0 ** ((r - float(reward)) / r))
            self.eps = 0.0 if eps < REWARD_HANDOVER * self.eps0 else eps
        return self.eps

    def __call__(self, step: int) -> float:
        if step != self.steps:
            raise RuntimeError(f"{self.name} schedule: asked for step {step}'s budget after {self.steps} observations")
        return self.eps

    def state_dict(self) -> dict:
        return {"eps": self.eps, "gap0": self.gap0, "gap_ema": self.gap_ema, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.eps, self.gap0, self.gap_ema, self.steps = (state["eps"], state["gap0"], state["gap_ema"],
                                                         int(state["steps"]))


@dataclass(frozen=True)
class Schedule:
    """The ``schedule`` config group, validated: the budget eps_k of a rule that reads one (TRB's trust
    region; ``fixed_blend`` is the trust region with ``schedule=constant``)."""

    name: str = "linear"
    eps0: float = 0.0
    warmup_steps: int = 0
    budget: str = "absolute"       # absolute: nats per token; relative: a fraction of KL(pi_T||pi_S)
    final_ratio: float = 0.01      # exponential: eps_{K-1} ~ eps0 * final_ratio
    handover: float = 0.5          # gap: plain OPD once the smoothed gap is this fraction of the first
    target_reward: float = 0.25    # reward: the rollouts' mean reward the controller aims at
    # the adaptive schedules' state (gap, reward): fed one observation per step by the trainer
    controller: AdaptiveBudget | None = field(default=None, compare=False, repr=False, metadata=NOT_A_KNOB)

    @classmethod
    def from_cfg(cls, cfg) -> "Schedule":
        s = cls(**knobs_from(cls, cfg, "schedule"))
        s.validate()
        return s

    @property
    def adaptive(self) -> bool:
        return self.name in ADAPTIVE

    def validate(self) -> None:
        if self.name not in SCHEDULES:
            bad("schedule.name", self.name, f"choose one of {', '.join(SCHEDULES)}")
        check_eps0(self.eps0, relative=self.budget == "relative")
        if self.warmup_steps < 1 and self.name in HORIZON:
            bad("schedule.warmup_steps", self.warmup_steps, "the warmup horizon K must be >= 1")
        check_controller(self.handover, self.target_reward)
        if self.name == "exponential" and not 0 < self.final_ratio <= 1:
            bad("schedule.final_ratio", self.final_ratio, "the decay ratio of the exponential schedule must be in (0, 1]")
        if self.budget not in BUDGETS:
            bad("schedule.budget", self.budget, f"choose one of {', '.join(BUDGETS)}")

    def attach_controller(self) -> "Schedule":
        """An adaptive schedule gets its state (once); the trainer feeds it through ``observe``."""
        if self.adaptive and self.controller is None:
            object.__setattr__(self, "controller", AdaptiveBudget(
                self.name, self.eps0, handover=self.handover, target_reward=self.target_reward,
                relative=self.budget == "relative"))
        return self

    def observe(self, gap: float, reward: float) -> None:
        if self.controller is not None:
            self.controller.observe(gap, reward)

    def __call__(self, step: int) -> float:
        if self.controller is not None:
            return self.controller(step)
        return budget_at(step, self.name, self.eps0, self.warmup_steps, self.final_ratio)
