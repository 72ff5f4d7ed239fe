"""A method = which behaviour rule produces the rollouts at step k, which target the student's loss
is taken against, which estimator computes it, and an optional warm start before step 0. Every
method is one YAML file in ``conf/method/`` read by ``Method.from_cfg``; the fields below all have
defaults that reduce to plain OPD, so a method YAML only names what it changes.

    opd          student rollouts;                          reverse KL(pi_S || pi_T) per prefix
    trb          trust-region blended rollouts, budget eps_k from the schedule group (0 after warmup)
    fixed_blend  trust-region blended rollouts, constant budget ``eps`` for the whole run
    skd          student proposes, a token outside the teacher's top-K is replaced by a teacher sample
    veto         student rollouts; target = geometric bridge q_b ∝ pi_T^b sg(pi_S)^(1-b), b: b_start -> 1
    temp_warmup  student rollouts at temperature t0 -> trainer.temperature over K steps
    sft_warmup   SFT on teacher samples for the prompts of the first N steps, then OPD
    offline_kd   teacher rollouts (the student never samples); cross-entropy or forward KL
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from trb_exp import losses
from trb_exp.config import ConfigError
from trb_exp.rollout import SKDRule, StudentRule, TeacherRule, TrustRegionRule
from trb_exp.schedules import ADAPTIVE, SCHEDULES, AdaptiveBudget, budget_at

ROLLOUTS = ("student", "trust_region", "teacher", "skd")
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
    handover: float = 0.5          # gap: plain OPD once the smoothed gap is this fraction of the first
    target_reward: float = 0.25    # reward: the rollouts' mean reward the controller aims at
    # the adaptive schedules' state (gap, reward): fed one observation per step by the trainer
    controller: AdaptiveBudget | None = field(default=None, compare=False, repr=False)

    @property
    def adaptive(self) -> bool:
        return self.name in ADAPTIVE

    def __call__(self, step: int) -> float:
        if self.controller is not None:
            return self.controller(step)
        return budget_at(step, self.name, self.eps0, self.warmup_steps, self.final_ratio)


def _checked(field: str, v, default):
    """``v`` when it has the kind of ``default`` (an int field takes an int, a float field any finite
    number); a string such as 'abc', inf or nan is a one-line ``ConfigError``."""
    from trb_exp.config import is_number

    if v is None or isinstance(v, str) and isinstance(default, str):
        return v
    if isinstance(default, int) and not isinstance(default, bool):
        if not (isinstance(v, int) and not isinstance(v, bool)):
            raise ConfigError(f"{field}={v!r}: must be an integer")
        return v
    if not is_number(v):
        raise ConfigError(f"{field}={v!r}: must be a finite number")
    return v


def ramp(step: int, start: float, end: float, K: int) -> float:
    """Linear from ``start`` at step 0 to ``end`` at step K, then ``end`` (K = 0: ``end`` throughout)."""
    if step >= K:
        return float(end)
    return start + (end - start) * step / K


@dataclass(frozen=True)
class Method:
    name: str
    rollout: str
    loss: str
    estimator: str
    topk: int  # support of the ``topk`` reverse-KL estimator
    schedule: Schedule
    # trust_region: a constant budget for every step instead of the schedule group's (fixed_blend)
    eps: float | None = None
    # skd: the teacher's top-K acceptance set and the temperature of its replacement samples
    teacher_top_k: int = 25
    teacher_temperature: float = 1.0
    # horizon (steps) of the method's anneals: veto's b and temp_warmup's temperature
    K: int = 0
    # veto: bridge exponent at step 0, annealed linearly to 1 (= pi_T, plain OPD) by step K
    b_start: float = 1.0
    # temp_warmup: rollout temperature at step 0, annealed linearly to trainer.temperature by step K
    t0: float | None = None
    # sft_warmup: n teacher samples per prompt of the first N steps, M SFT updates before step 0
    sft_samples: int = 4
    sft_steps: int = 50
    sft_updates: int = 0

    @classmethod
    def from_cfg(cls, method_cfg, schedule_cfg) -> "Method":
        def g(key, default=None):  # a numeric field: a finite number of the right kind, else one line
            v = method_cfg.get(key, default)
            return _checked(f"method.{key}", v, default)

        def sg(key, default=None):
            return _checked(f"schedule.{key}", schedule_cfg.get(key, default), default)

        m = cls(
            name=str(method_cfg.name),
            rollout=str(method_cfg.rollout),
            loss=str(method_cfg.loss),
            estimator=str(method_cfg.get("estimator", "topk")),
            topk=int(g("topk", 16)),
            schedule=Schedule(
                name=str(schedule_cfg.name),
                eps0=float(sg("eps0", 0.0)),
                warmup_steps=int(sg("warmup_steps", 0)),
                budget=str(schedule_cfg.get("budget", "absolute")),
                final_ratio=float(sg("final_ratio", 0.01)),
                handover=float(sg("handover", 0.5)),
                target_reward=float(sg("target_reward", 0.25)),
            ),
            eps=None if g("eps") is None else float(g("eps")),
            teacher_top_k=int(g("teacher_top_k", 25)),
            teacher_temperature=float(g("teacher_temperature", 1.0)),
            K=int(g("K", 0)),
            b_start=float(g("b_start", 1.0)),
            t0=None if g("t0") is None else float(g("t0")),
            sft_samples=int(g("sft_samples", 4)),
            sft_steps=int(g("sft_steps", 50)),
            sft_updates=int(g("sft_updates", 0)),
        )
        m.validate()
        s = m.schedule
        if s.adaptive and m.rollout == "trust_region" and m.eps is None:
            object.__setattr__(s, "controller", AdaptiveBudget(s.name, s.eps0, handover=s.handover,
                                                               target_reward=s.target_reward,
                                                               relative=s.budget == "relative"))
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
        if s.warmup_steps < 1 and s.name not in ("constant", "none", *ADAPTIVE):
            bad("schedule.warmup_steps", s.warmup_steps, "the warmup horizon K must be >= 1")
        if not 0 <= s.handover < 1:
            bad("schedule.handover", s.handover, "the hand-over fraction of the initial gap must be in [0, 1)")
        if not 0 < s.target_reward <= 1:
            bad("schedule.target_reward", s.target_reward, "a target mean reward must be in (0, 1]")
        if s.name == "exponential" and not 0 < s.final_ratio <= 1:
            bad("schedule.final_ratio", s.final_ratio, "the decay ratio of the exponential schedule must be in (0, 1]")
        if s.budget not in BUDGETS:
            bad("schedule.budget", s.budget, f"choose one of {', '.join(BUDGETS)}")
        field, eps = ("schedule.eps0", s.eps0) if self.eps is None else ("method.eps", self.eps)
        if s.budget == "relative" and eps > 1:
            bad(field, eps, "a relative budget is a fraction of KL(pi_T||pi_S): use a value in [0, 1]")
        if self.rollout == "teacher" and self.loss == "reverse_kl" and self.estimator == "sampled":
            bad("method.estimator", self.estimator, "the sampled estimator needs student rollouts")
        if self.eps is not None and not self.eps >= 0:
            bad("method.eps", self.eps, "a KL budget must be >= 0 (0 = plain OPD)")
        if self.eps is not None and self.rollout != "trust_region":
            bad("method.eps", self.eps, "a constant budget needs rollout: trust_region (or set method.eps=null)")
        if self.teacher_top_k < 1:
            bad("method.teacher_top_k", self.teacher_top_k, "the teacher's top-K acceptance set needs K >= 1")
        if not self.teacher_temperature > 0:
            bad("method.teacher_temperature", self.teacher_temperature, "a sampling temperature must be > 0")
        if self.K < 0:
            bad("method.K", self.K, "the anneal horizon must be >= 0 steps (0 = no anneal)")
        if not 0 < self.b_start <= 1:
            bad("method.b_start", self.b_start, "the bridge exponent must be in (0, 1] (1 = the teacher, plain OPD)")
        if self.b_start < 1 and self.loss == "ce":
            bad("method.b_start", self.b_start, "the bridge target needs a KL loss (reverse_kl or forward_kl), not ce")
        if self.t0 is not None and not self.t0 > 0:
            bad("method.t0", self.t0, "a sampling temperature must be > 0")
        if self.sft_updates < 0:
            bad("method.sft_updates", self.sft_updates, "the number of SFT updates M must be >= 0 (0 = no warm start)")
        if self.sft_updates and self.sft_samples < 1:
            bad("method.sft_samples", self.sft_samples, "the teacher samples per prompt n must be >= 1")
        if self.sft_updates and self.sft_steps < 1:
            bad("method.sft_steps", self.sft_steps, "the SFT prompts come from the first N >= 1 steps")

    # -- rollouts -------------------------------------------------------------------------------
    def budget(self, step: int) -> float:
        """The trust-region budget eps_k (0 when the rollouts are not blended)."""
        if self.rollout != "trust_region":
            return 0.0
        return self.eps if self.eps is not None else self.schedule(step)

    def temperature(self, step: int, base: float = 1.0) -> float:
        """The rollout temperature at ``step``: ``base`` (trainer.temperature), or temp_warmup's ramp
        from ``t0`` to ``base`` over K steps."""
        return base if self.t0 is None else ramp(step, self.t0, base, self.K)

    def rule(self, step: int, temperature: float = 1.0, generator=None):
        """The behaviour rule at training step ``step``. A zero budget falls back to plain student
        sampling, so TRB after warmup costs exactly what OPD costs (no teacher in the decode loop).
        ``generator`` feeds rules that sample inside themselves (SKD's proposal and replacement)."""
        t = self.temperature(step, temperature)
        if self.rollout == "teacher":
            return TeacherRule(t)
        if self.rollout == "skd":
            return SKDRule(self.teacher_top_k, self.teacher_temperature, temperature=t, generator=generator)
        eps = self.budget(step)
        if self.rollout == "trust_region" and eps > 0:
            return TrustRegionRule(eps, budget=self.schedule.budget, temperature=t)
        return StudentRule(t)

    # -- loss -----------------------------------------------------------------------------------
    @property
    def needs_teacher_logprobs(self) -> bool:
        return self.loss != "ce"

    def bridge_b(self, step: int) -> float:
        """Veto's bridge exponent b at ``step`` (1 = the teacher itself, i.e. no bridge)."""
        return ramp(step, self.b_start, 1.0, self.K)

    def target_logprobs(self, student_logits: Tensor, teacher_logprobs: Tensor, step: int = 0) -> Tensor:
        """The distribution the KL losses pull the student towards: pi_T, or Veto's geometric bridge
        ``q_b ∝ pi_T^b sg(pi_S)^(1-b)`` while b < 1."""
        b = self.bridge_b(step)
        if b >= 1.0:
            return teacher_logprobs
        return losses.geometric_bridge_target(teacher_logprobs, student_logits, b)

    def per_token_loss(self, student_logits: Tensor, teacher_logprobs: Tensor | None, tokens: Tensor,
                       step: int = 0) -> Tensor:
        """[B, T] per-token loss at training step ``step``; reduce with ``losses.masked_token_mean``."""
        if self.loss == "ce":
            return losses.cross_entropy(student_logits, tokens)
        target = self.target_logprobs(student_logits, teacher_logprobs, step)
        if self.loss == "forward_kl":
            return losses.kl_teacher_student_full(student_logits, target)
        if self.estimator == "full":
            return losses.kl_student_teacher_full(student_logits, target)
        if self.estimator == "topk":
            return losses.kl_student_teacher_topk(student_logits, target, k=self.topk)
        return losses.kl_student_teacher_sampled(student_logits, target, tokens)

    @property
    def sparse_teacher_ok(self) -> bool:
        """Whether the loss needs the teacher only on the student's top-k support and the sampled token
        (``rollout.teacher_stats=topk``): reverse KL with the topk or sampled estimator and no bridge."""
        return self.loss == "reverse_kl" and self.estimator in ("topk", "sampled") and self.b_start >= 1.0

    def per_token_loss_sparse(self, student_logits: Tensor, topk_ids: Tensor | None, teacher_on_ids: Tensor | None,
                              tokens: Tensor, teacher_on_tokens: Tensor | None) -> Tensor:
        """[B, T] per-token loss from O(k) teacher statistics (``sparse_teacher_ok``): the top-k reverse KL on
        the given support, or the sampled estimator on the sampled tokens; same values and gradients as
        :meth:`per_token_loss` with the full teacher log-probs on the same support."""
        if self.estimator == "topk":
            return losses.kl_student_teacher_topk_gathered(student_logits, topk_ids, teacher_on_ids)
        return losses.kl_student_teacher_sampled_gathered(student_logits, tokens, teacher_on_tokens)

    @property
    def logs_kl_estimate(self) -> bool:
        """The sampled estimator's loss value is a policy-gradient surrogate, not a KL: log the
        single-sample estimate ``log pS(y) - log q(y)`` instead (``train/kl_estimate``)."""
        return self.loss == "reverse_kl" and self.estimator == "sampled"

    def kl_estimate(self, student_logits: Tensor, teacher_logprobs: Tensor, tokens: Tensor, step: int = 0) -> Tensor:
        """[B, T] per-token ``log pS(y) - log q(y)`` against the loss target q (no gradient)."""
        target = self.target_logprobs(student_logits, teacher_logprobs, step)
        return losses.sampled_kl_estimate(student_logits, target, tokens)

    def observe(self, gap: float, reward: float) -> None:
        """Feed an adaptive budget schedule (gap, reward) the step's measurements: the mean per-token
        reverse-KL estimate and the mean reward of the rollouts. A no-op for every other schedule."""
        if self.schedule.controller is not None:
            self.schedule.controller.observe(gap, reward)

    def diagnostics(self, step: int, temperature: float = 1.0) -> dict[str, float]:
        """The method's per-step knobs, logged with every training step."""
        m = {"trb/eps": self.budget(step), "rollout/temperature": self.temperature(step, temperature)}
        if self.b_start < 1:
            m["veto/b"] = self.bridge_b(step)
        return m
