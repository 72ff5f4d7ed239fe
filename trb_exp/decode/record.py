"""The rollout record: ``Rollout`` (what a decode backend returns), the position ids of left-padded rows, the
row-chunk concatenation, and the O(k) teacher statistics one decode step records (``topk_stats``, shared by the
eager loop and the static engine)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Rollout", "concat_rollouts", "positions_from_mask", "topk_stats"]


@dataclass
class Rollout:
    """A batch of sampled responses. ``T`` = response length (padded), ``P`` = prompt length.

    input_ids        [B, P+T]  left-padded prompt followed by the right-padded response
    attention_mask   [B, P+T]  1 on real tokens
    response_mask    [B, T]    1 on response tokens (the EOS included), 0 after it
    teacher_logprobs [B, T, V] teacher log-probs (temperature 1) predicting each response token,
                               when the teacher ran during decoding, else None
    diagnostics      name -> [B, T] per-token values of the behaviour rule

    With ``teacher_stats="topk"`` the [B, T, V] tensor is never built; instead (O(B*T*k)):
    topk_ids              [B, T, k] the rollout student's top-k token ids (by logit) at each position
    teacher_topk_logprobs [B, T, k] the teacher's log-probs at those ids (teacher ran during decoding)
    teacher_token_logprobs [B, T]   the teacher's log-prob of the sampled token
    teacher_entropy       [B, T]    the teacher's entropy (for the logs)
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_len: int
    teacher_logprobs: Tensor | None
    token_logprobs_student: Tensor | None
    finished: Tensor  # [B] the response ended with EOS within the length limit
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    decode_s: float = 0.0  # wall time of the decode loop
    rule_s: float = 0.0  # of which spent inside the behaviour rule (the TRB solver)
    topk_ids: Tensor | None = None
    teacher_topk_logprobs: Tensor | None = None
    teacher_token_logprobs: Tensor | None = None
    teacher_entropy: Tensor | None = None

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids for left-padded rows: 0 at the first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of the same prompts' tensor, sampled in row chunks (``trainer.rollout_batch_size``: the KV
    caches of one chunk at a time), stacked along the batch; responses right-padded with ``pad_id``."""
    T = max(r.response_mask.shape[1] for r in parts)

    def pad(x: Tensor | None, value) -> Tensor | None:
        if x is None:
            return None
        extra = T - x.shape[1]
        if extra == 0:
            return x
        shape = (x.shape[0], extra, *x.shape[2:])
        return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], 1)

    P = parts[0].prompt_len
    responses = [pad(r.response_ids, pad_id) for r in parts]
    return Rollout(
        input_ids=torch.cat([torch.cat([r.input_ids[:, :P], resp], 1) for r, resp in zip(parts, responses)]),
        attention_mask=torch.cat([torch.cat([r.attention_mask[:, :P], pad(r.response_mask.long(), 0)], 1)
                                  for r in parts]),
        response_mask=torch.cat([pad(r.response_mask, False) for r in parts]),
        prompt_len=P,
        teacher_logprobs=None if parts[0].teacher_logprobs is None else torch.cat(
            [pad(r.teacher_logprobs, 0.0) for r in parts]),
        token_logprobs_student=None if parts[0].token_logprobs_student is None else torch.cat(
            [pad(r.token_logprobs_student, 0.0) for r in parts]),
        finished=torch.cat([r.finished for r in parts]),
        diagnostics={k: torch.cat([pad(r.diagnostics[k], 0.0) for r in parts]) for k in parts[0].diagnostics},
        decode_s=sum(r.decode_s for r in parts),
        rule_s=sum(r.rule_s for r in parts),
        **{k: None if getattr(parts[0], k) is None else torch.cat([pad(getattr(r, k), 0) for r in parts])
           for k in ("topk_ids", "teacher_topk_logprobs", "teacher_token_logprobs", "teacher_entropy")},
    )


def topk_stats(student_logits: Tensor | None, teacher_logits: Tensor | None, tok: Tensor, k: int):
    """The O(k) teacher statistics of one decode step: the student's top-k ids [B, k] (by logit), the
    teacher's log-probs (temperature 1) there [B, k] and at the sampled token [B], and the teacher's
    entropy [B]. Any missing model gives None for what depends on it."""
    ids = t_ids = t_tok = ent = None
    if student_logits is not None:
        s = torch.nan_to_num(student_logits.float(), nan=-math.inf)
        ids = s.topk(min(k, s.shape[-1]), dim=-1).indices
    if teacher_logits is not None:
        lt = torch.log_softmax(teacher_logits.float(), -1)
        t_tok = lt.gather(-1, tok[:, None]).squeeze(-1)
        ent = -(lt.exp() * lt.clamp_min(-1e4)).sum(-1)
        if ids is not None:
            t_ids = lt.gather(-1, ids)
    return ids, t_ids, t_tok, ent
