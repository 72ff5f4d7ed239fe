"""``greedy``: the argmax of the student (greedy evaluation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trb_exp.rules.base import Rule, Sampler, register


@dataclass
class GreedySampler(Sampler):
    needs_student: bool = True
    needs_teacher: bool = False

    def __call__(self, student_logits, teacher_logits):
        logp = torch.full_like(student_logits, float("-inf"), dtype=torch.float32)
        return logp.scatter_(-1, student_logits.argmax(-1, keepdim=True), 0.0), {}


@register("greedy")
@dataclass(frozen=True)
class Greedy(Rule):
    def at(self, step, temperature=1.0, generator=None) -> GreedySampler:
        return GreedySampler()
