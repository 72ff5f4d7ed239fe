"""The base classes of a behaviour rule and the registry (see the package docstring)."""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

from torch import Tensor

from trb_exp.knobs import Registry, knobs_from

RULES = Registry("method.rollout", sort_choices=True)  # name -> Rule class


def register(name: str):
    """Class decorator: the rule ``method.rollout=<name>`` selects."""
    return RULES.register(name)


def rule_class(name: str) -> type[Rule]:
    return RULES.lookup(name)


class Sampler:
    """Mixin of the per-step samplers. ``needs_student``/``needs_teacher``: which models the decode loop
    runs; ``__call__(student_logits, teacher_logits) -> (behaviour log-probs [B, V], {name: [B]})``."""

    needs_student: bool
    needs_teacher: bool

    def for_static_engine(self, solver_iters: int | None) -> Sampler:
        """The sampler the static engine runs (``static.sample_static``): itself, unless the rule has a
        sync-free variant (the trust-region solver)."""
        return self


@dataclasses.dataclass(frozen=True)
class Rule(abc.ABC):
    """A behaviour rule as a method configures it. Subclasses: frozen dataclasses of their knobs."""

    name: ClassVar[str] = ""
    on_policy: ClassVar[bool] = True  # the rollouts start from the student's own samples (the sampled estimator)

    @classmethod
    def from_cfg(cls, method_cfg, schedule=None) -> Rule:
        """The rule from the ``method`` group's knobs (and the validated ``schedule`` group, for a rule
        that reads it), validated."""
        rule = cls(**knobs_from(cls, method_cfg, "method"))
        rule.validate()
        return rule.with_schedule(schedule)

    def validate(self) -> None:
        """Raise a one-line ``ConfigError`` naming the field and the fix for a bad knob value."""

    def with_schedule(self, schedule) -> Rule:
        return self

    @property
    def schedule(self):
        """The schedule this rule reads (None: it reads none)."""
        return None

    @abc.abstractmethod
    def at(self, step: int, temperature: float = 1.0, generator=None) -> Sampler:
        """The sampler of training step ``step`` at sampling temperature ``temperature``."""

    def knobs(self, step: int) -> dict[str, float]:
        """The rule's knob values at ``step``, logged with every training step. Every rule logs
        ``trb/eps``, its trust-region KL budget: 0 for a rule without one (the committed runs' logs)."""
        return {"trb/eps": 0.0}

    def summarize(self, diagnostics: dict[str, Tensor], mask: Tensor, rollout=None) -> dict[str, float]:
        """Per-step metrics from the sampler's per-token ``diagnostics`` ([B, T] each) on the response
        tokens ``mask``; ``rollout`` gives the timings (``decode_s``, ``rule_s``)."""
        return {}

    def observe(self, gap: float, reward: float) -> None:
        """The step's measurements (mean per-token gap, mean reward), for a rule with an adaptive knob."""
