"""A method = a behaviour rule that produces the rollouts at step k (``method.rollout``, one of
``trb_exp/rules/``), a loss the student is trained with (``method.loss``, ``trb_exp/objectives.py``),
an optional rollout-temperature warmup and an optional SFT warm start before step 0. Every method is
one YAML file in ``conf/method/``; each component reads its own knobs from it (defaults written once,
in the component's dataclass), validates them, and a knob no component reads is an error.

    opd          student rollouts;                          reverse KL(pi_S || pi_T) per prefix
    trb          trust-region blended rollouts, budget eps_k from the schedule group (0 after warmup)
    fixed_blend  the same rule with schedule=constant (a constant budget schedule.eps0)
    skd          student proposes, a token outside the teacher's top-K is replaced by a teacher sample
    veto         student rollouts; target = geometric bridge q_b ∝ pi_T^b sg(pi_S)^(1-b), b: b_start -> 1
    temp_warmup  student rollouts at temperature t0 -> trainer.temperature over K steps
    sft_warmup   SFT on teacher samples for the prompts of the first N steps, then OPD
    offline_kd   teacher rollouts (the student never samples); cross-entropy or forward KL
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from trb_exp.config import ConfigError
from trb_exp.knobs import NOT_A_KNOB, bad, knob_fields, knobs_from, ramp
from trb_exp.objectives import Loss, loss_class
from trb_exp.rules import Rule, Sampler, rule_class
from trb_exp.schedules import Schedule

RENAMED = {"eps": "fixed_blend's constant budget is now the schedule's: use schedule=constant schedule.eps0=<eps>"}


@dataclass(frozen=True)
class Method:
    name: str = field(metadata=NOT_A_KNOB)
    behaviour: Rule = field(metadata=NOT_A_KNOB)   # the configured rule (method.rollout)
    objective: Loss = field(metadata=NOT_A_KNOB)   # the configured loss (method.loss)
    schedule: Schedule = field(metadata=NOT_A_KNOB)  # the schedule group, validated (read by e.g. trust_region)
    t0: float | None = None  # temp_warmup: rollout temperature at step 0, annealed to trainer.temperature by step K
    K: int = 0               # horizon (steps) of the method's anneals: temp_warmup's temperature, veto's b
    sft_samples: int = 4     # sft_warmup: n teacher samples per prompt of the first N steps,
    sft_steps: int = 50      # N,
    sft_updates: int = 0     # M SFT updates before step 0 (0 = no warm start)

    @classmethod
    def from_cfg(cls, method_cfg, schedule_cfg) -> Method:
        rule_cls = rule_class(str(method_cfg.rollout))
        loss_cls = loss_class(str(method_cfg.loss))
        _check_keys(method_cfg, cls, rule_cls, loss_cls)
        own = knobs_from(cls, method_cfg, "method")
        _validate(**own)
        schedule = Schedule.from_cfg(schedule_cfg)
        rule = rule_cls.from_cfg(method_cfg, schedule)
        loss = loss_cls.from_cfg(method_cfg, horizon=own.get("K", 0), rule=rule)
        return cls(name=str(method_cfg.name), behaviour=rule, objective=loss, schedule=schedule, **own)

    # -- rollouts -------------------------------------------------------------------------------
    def temperature(self, step: int, base: float = 1.0) -> float:
        """The rollout temperature at ``step``: ``base`` (trainer.temperature), or temp_warmup's ramp
        from ``t0`` to ``base`` over K steps."""
        return base if self.t0 is None else ramp(step, self.t0, base, self.K)

    def sampler(self, step: int, temperature: float = 1.0, generator=None) -> Sampler:
        """The behaviour rule's sampler at training step ``step``. ``generator`` feeds rules that sample
        inside themselves (SKD's proposal and replacement)."""
        return self.behaviour.at(step, self.temperature(step, temperature), generator)

    def diagnostics(self, step: int, temperature: float = 1.0) -> dict[str, float]:
        """The method's per-step knobs, logged with every training step."""
        return {**self.behaviour.knobs(step), "rollout/temperature": self.temperature(step, temperature),
                **self.objective.knobs(step)}

    def summarize(self, rollout) -> dict[str, float]:
        """The behaviour rule's per-step metrics from the rollout's per-token diagnostics."""
        return self.behaviour.summarize(rollout.diagnostics, rollout.response_mask, rollout)

    def stateful(self) -> dict:
        """What of the method changes while training and is checkpointed by name (an adaptive budget)."""
        c = self.schedule.controller
        return {"budget": c} if c is not None else {}

    def observe(self, gap: float, reward: float) -> None:
        """Feed the rule (an adaptive budget schedule) the step's mean per-token gap and mean reward."""
        self.behaviour.observe(gap, reward)

    # -- loss (the trainer's calls) -------------------------------------------------------------
    @property
    def topk(self) -> int:
        return self.objective.topk

    @property
    def estimator(self) -> str:
        return self.objective.estimator

    @property
    def needs_teacher_logprobs(self) -> bool:
        return self.objective.needs_teacher_logprobs

    @property
    def sparse_teacher_ok(self) -> bool:
        return self.objective.sparse_ok

    @property
    def logs_kl_estimate(self) -> bool:
        return self.objective.logs_kl_estimate

    def per_token_loss(self, student_logits: Tensor, teacher_logprobs: Tensor | None, tokens: Tensor,
                       step: int = 0) -> Tensor:
        return self.objective.per_token(student_logits, teacher_logprobs, tokens, step)

    def per_token_loss_sparse(self, *args) -> Tensor:
        return self.objective.per_token_sparse(*args)

    def kl_estimate(self, student_logits: Tensor, teacher_logprobs: Tensor, tokens: Tensor, step: int = 0) -> Tensor:
        return self.objective.kl_estimate(student_logits, teacher_logprobs, tokens, step)


def _validate(t0=None, K=0, sft_samples=4, sft_steps=50, sft_updates=0) -> None:
    if K < 0:
        bad("method.K", K, "the anneal horizon must be >= 0 steps (0 = no anneal)")
    if t0 is not None and not t0 > 0:
        bad("method.t0", t0, "a sampling temperature must be > 0")
    if sft_updates < 0:
        bad("method.sft_updates", sft_updates, "the number of SFT updates M must be >= 0 (0 = no warm start)")
    if sft_updates and sft_samples < 1:
        bad("method.sft_samples", sft_samples, "the teacher samples per prompt n must be >= 1")
    if sft_updates and sft_steps < 1:
        bad("method.sft_steps", sft_steps, "the SFT prompts come from the first N >= 1 steps")


def _check_keys(method_cfg, *components) -> None:
    """A ``method.*`` key that neither the method nor its rule nor its loss reads is a one-line error."""
    known = {"name", "rollout", "loss"} | {f.name for c in components for f in knob_fields(c)}
    for key in method_cfg:
        if key not in known:
            fix = RENAMED.get(key) or (f"not a knob of rollout={method_cfg.rollout} or loss={method_cfg.loss} "
                                       f"(theirs and the method's: {', '.join(sorted(known))}); remove it")
            raise ConfigError(f"method.{key}={method_cfg.get(key)!r}: {fix}")
