"""``skd``: Speculative KD's interleaved sampling (Xu et al. 2024, arXiv 2410.11325)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trb_exp.knobs import bad
from trb_exp.rules.base import Rule, Sampler, register


@dataclass
class SKDSampler(Sampler):
    """The student proposes a token (at ``temperature``); if it is not among the teacher's ``top_k``
    tokens at this prefix it is replaced by ONE fresh sample from the teacher at
    ``teacher_temperature``; decoding continues from the accepted token. The rule samples itself (with
    ``generator``) and returns a one-hot behaviour distribution on the accepted token, so the decode
    loop emits exactly that token; diagnostic ``replaced`` is 1 where the proposal was replaced."""

    top_k: int
    teacher_temperature: float = 1.0
    temperature: float = 1.0
    generator: torch.Generator | None = None
    needs_student: bool = True
    needs_teacher: bool = True

    def correct(self, proposals: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Accepted tokens [B] and the bool ``replaced`` [B] for given proposals [B]."""
        t = torch.nan_to_num(teacher_logits.float(), nan=float("-inf"))
        top = t.topk(min(self.top_k, t.shape[-1]), dim=-1).indices
        replaced = ~(top == proposals[:, None]).any(-1)
        draw = torch.multinomial(torch.softmax(t / self.teacher_temperature, -1), 1, generator=self.generator)
        return torch.where(replaced, draw.squeeze(-1), proposals), replaced

    def __call__(self, student_logits, teacher_logits):
        s = torch.softmax(student_logits.float() / self.temperature, -1)
        proposals = torch.multinomial(s, 1, generator=self.generator).squeeze(-1)
        tokens, replaced = self.correct(proposals, teacher_logits)
        logp = torch.full_like(s, float("-inf")).scatter_(-1, tokens[:, None], 0.0)
        return logp, {"replaced": replaced.float()}


@register("skd")
@dataclass(frozen=True)
class SKD(Rule):
    teacher_top_k: int = 25             # the teacher's top-K acceptance set
    teacher_temperature: float = 1.0    # of the replacement samples

    def validate(self) -> None:
        if self.teacher_top_k < 1:
            bad("method.teacher_top_k", self.teacher_top_k, "the teacher's top-K acceptance set needs K >= 1")
        if not self.teacher_temperature > 0:
            bad("method.teacher_temperature", self.teacher_temperature, "a sampling temperature must be > 0")

    def at(self, step, temperature=1.0, generator=None) -> SKDSampler:
        return SKDSampler(self.teacher_top_k, self.teacher_temperature, temperature=temperature, generator=generator)

    def summarize(self, diagnostics, mask, rollout=None) -> dict[str, float]:
        if "replaced" not in diagnostics:
            return {}
        return {"skd/replaced_frac": diagnostics["replaced"][mask].mean().item()}
