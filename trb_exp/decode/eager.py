"""The eager decode loop (``rollout.engine=eager``): one Hugging Face forward per model and decoded token, with the
two models' KV caches; the behaviour sampler turns the two next-token distributions into the one the token is
drawn from. Runs any architecture; the static engine (``decode/static.py``) computes the same tokens."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from trb_exp.blending import merge_eos
from trb_exp.decode.forward import decode_step
from trb_exp.decode.record import Rollout, positions_from_mask, topk_stats

__all__ = ["EagerRecord", "sample_eager"]


class EagerRecord:
    """What the eager loop keeps of each decoded position: the token, which rows were alive, the teacher's
    statistics (full log-probs, or the top-k ones), the student's log-prob of the token, the rule's
    per-token diagnostics; ``rollout`` stacks them into a ``Rollout``."""

    def __init__(self, keep_teacher: bool, teacher_stats: str, topk: int, needs_student: bool):
        self.keep_teacher, self.topk = keep_teacher, topk
        self.keep_full = keep_teacher and teacher_stats == "full"
        self.rec_topk = teacher_stats == "topk" and (needs_student or keep_teacher)
        self.tokens, self.alive, self.t_full, self.s_tok = [], [], [], []
        self.topk_rec: dict[str, list[Tensor]] = {}
        self.diags: dict[str, list[Tensor]] = {}

    def add(self, tok: Tensor, alive: Tensor, logits: dict[str, Tensor], diag: dict[str, Tensor]) -> None:
        self.tokens.append(tok)
        self.alive.append(alive.clone())
        if "teacher" in logits and self.keep_full:
            self.t_full.append(torch.log_softmax(logits["teacher"].float(), -1))
        if self.rec_topk:
            stats = topk_stats(logits.get("student"), logits.get("teacher") if self.keep_teacher else None,
                               tok, self.topk)
            for name, val in zip(("topk_ids", "teacher_topk_logprobs", "teacher_token_logprobs", "teacher_entropy"),
                                 stats):
                if val is not None:
                    self.topk_rec.setdefault(name, []).append(val)
        if "student" in logits:
            s_lp = torch.log_softmax(logits["student"].float(), -1)
            self.s_tok.append(s_lp.gather(-1, tok[:, None]).squeeze(-1))
        for k, v in diag.items():
            self.diags.setdefault(k, []).append(v)

    def rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, finished: Tensor, decode_s: float,
                rule_s: float) -> Rollout:
        response, response_mask = torch.stack(self.tokens, 1), torch.stack(self.alive, 1)
        return Rollout(
            input_ids=torch.cat([prompt_ids, response], 1),
            attention_mask=torch.cat([prompt_mask.long(), response_mask.long()], 1),
            response_mask=response_mask,
            prompt_len=prompt_ids.shape[1],
            teacher_logprobs=torch.stack(self.t_full, 1) if self.t_full else None,
            token_logprobs_student=torch.stack(self.s_tok, 1) if self.s_tok else None,
            finished=finished,
            diagnostics={k: torch.stack(v, 1) for k, v in self.diags.items()},
            decode_s=decode_s,
            rule_s=rule_s,
            **{k: torch.stack(v, 1) for k, v in self.topk_rec.items()},
        )


@torch.no_grad()
def sample_eager(student, teacher, prompt_ids, prompt_mask, rule, *, max_new_tokens, eos_id, pad_id, generator=None,
                 keep_teacher_logprobs: bool = True, eos_ids=(), teacher_stats: str = "full",
                 topk: int = 16) -> Rollout:
    """The eager loop: one Hugging Face forward per model and decoded token, the attention mask grown by one
    column per token, a host check of "all rows finished?" after each. ``teacher_stats`` and ``topk``: what it keeps
    of the teacher (``EagerRecord``)."""
    record = EagerRecord(keep_teacher_logprobs, teacher_stats, topk, rule.needs_student)
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    mask = prompt_mask.long()
    pos = positions_from_mask(mask)
    models = {}
    if rule.needs_student:
        models["student"] = student
    if rule.needs_teacher:
        models["teacher"] = teacher
    logits, caches = {}, {}
    for name, m in models.items():
        logits[name], caches[name] = decode_step(m, prompt_ids, mask, pos, None)
    next_pos = pos[:, -1:] + 1
    alive = torch.ones(B, dtype=torch.bool, device=device)
    other_eos = [int(i) for i in dict.fromkeys(eos_ids) if int(i) != int(eos_id)]
    all_eos = [int(eos_id), *other_eos]
    other_eos_t = torch.tensor(other_eos, dtype=torch.long, device=device)
    t0, rule_s = time.perf_counter(), 0.0
    for _ in range(max_new_tokens):
        if other_eos:  # one shared end-of-sequence event at eos_id, in both distributions
            logits = {k: merge_eos(v, all_eos, eos_id) for k, v in logits.items()}
        t_rule = time.perf_counter()
        behavior, diag = rule(logits.get("student"), logits.get("teacher"))
        rule_s += time.perf_counter() - t_rule
        behavior = torch.nan_to_num(behavior, nan=float("-inf"))
        tok = torch.multinomial(behavior.exp(), 1, generator=generator).squeeze(-1)
        if other_eos:  # a rule that ignores the merged logits could still pick another EOS id
            tok = torch.where(torch.isin(tok, other_eos_t), torch.full_like(tok, eos_id), tok)
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        record.add(tok, alive, logits, diag)
        alive = alive & (tok != eos_id)
        if not alive.any():
            break
        mask = torch.cat([mask, record.alive[-1].long()[:, None]], 1)
        for name, m in models.items():
            logits[name], caches[name] = decode_step(m, tok[:, None], mask, next_pos, caches[name])
        next_pos = next_pos + 1
    return record.rollout(prompt_ids, prompt_mask, ~alive, time.perf_counter() - t0, rule_s)
