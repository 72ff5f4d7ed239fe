"""``teacher``: pure teacher sampling (offline KD's data, the SFT warm start's data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from trb_exp.rules.base import Rule, Sampler, register


@dataclass
class TeacherSampler(Sampler):
    temperature: float = 1.0
    needs_student: bool = False
    needs_teacher: bool = True

    def __call__(self, student_logits, teacher_logits):
        return torch.log_softmax(teacher_logits.float() / self.temperature, -1), {}


@register("teacher")
@dataclass(frozen=True)
class Teacher(Rule):
    on_policy: ClassVar[bool] = False  # the student never samples

    def at(self, step, temperature=1.0, generator=None) -> TeacherSampler:
        return TeacherSampler(temperature)
