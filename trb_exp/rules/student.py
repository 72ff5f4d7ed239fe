"""``student``: pure student sampling (OPD, veto, temp_warmup, sft_warmup; evaluation at temperature 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trb_exp.rules.base import Rule, Sampler, register


@dataclass
class StudentSampler(Sampler):
    temperature: float = 1.0
    needs_student: bool = True
    needs_teacher: bool = False

    def __call__(self, student_logits, teacher_logits):
        return torch.log_softmax(student_logits.float() / self.temperature, -1), {}


@register("student")
@dataclass(frozen=True)
class Student(Rule):
    def at(self, step, temperature=1.0, generator=None) -> StudentSampler:
        return StudentSampler(temperature)
