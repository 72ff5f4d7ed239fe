"""Teacher passes: the teacher's log-probabilities over a rollout's response positions, computed after decoding
(when the teacher did not run during it, or its statistics were not kept). ``teacher_logprobs``: the full
[B, T, V]; ``teacher_logprobs_at``: only at given ids, with the LM head run in position chunks.

``TeacherTargets``: the one object the loss asks for each micro-batch's teacher targets. It knows the four sources
(the rollout's full log-probs, one batched pass for the step, one pass per micro-batch, the O(k) statistics from
the rollout or one gathered pass) and applies the EOS merge (``blending.merge_eos``) in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trb_exp.blending import merge_eos
from trb_exp.decode.config import RolloutConfig
from trb_exp.decode.forward import response_logits
from trb_exp.decode.record import Rollout, positions_from_mask

__all__ = ["MicroBatchTargets", "TeacherTargets", "teacher_logprobs", "teacher_logprobs_at"]


@torch.no_grad()
def teacher_logprobs(teacher, rollout: Rollout, rows: slice = slice(None)) -> Tensor:
    """The teacher's log-probs over the response positions in one batched pass [B, T, V] (of the
    rollout's ``rows``)."""
    logits = response_logits(teacher, rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_len)
    return torch.log_softmax(logits.float(), -1)


def _base_model(model):
    return getattr(model, getattr(model, "base_model_prefix", "model"))


@torch.no_grad()
def teacher_logprobs_at(teacher, rollout: Rollout, ids: Tensor, rows: slice = slice(None), *, chunk: int = 256,
                        merge=None) -> Tensor:
    """The teacher's log-probs (temperature 1) at ``ids`` [b, T, m] for the rollout's ``rows``, from one batched
    teacher pass whose LM head runs ``chunk`` positions at a time: the peak is [b, chunk, V], never [b, T, V].
    ``merge``: a function applied to the logits before the log-softmax (the EOS merge)."""
    input_ids, attn = rollout.input_ids[rows], rollout.attention_mask[rows]
    home = input_ids.device
    dev = getattr(teacher, "device", home)
    P = rollout.prompt_len
    pos = positions_from_mask(attn)
    hidden = _base_model(teacher)(input_ids=input_ids.to(dev), attention_mask=attn.to(dev),
                                  position_ids=pos.to(dev), use_cache=False).last_hidden_state[:, P - 1 : -1]
    vocab = getattr(teacher, "trb_vocab_size", None)
    ids = ids.to(dev)
    out = []
    for c in range(0, hidden.shape[1], chunk):
        logits = teacher.lm_head(hidden[:, c : c + chunk])
        if vocab is not None:
            logits = logits[..., :vocab]
        if merge is not None:
            logits = merge(logits)
        out.append(torch.log_softmax(logits.float(), -1).gather(-1, ids[:, c : c + chunk]))
    return torch.cat(out, 1).to(home)


@dataclass(frozen=True)
class MicroBatchTargets:
    """The teacher's targets of one micro-batch [b rows], EOS-merged. Dense (``sparse`` False): ``full`` [b, T, V]
    log-probs, or None for a loss that reads no teacher. Sparse (``rollout.teacher_stats=topk``): ``topk_ids``
    [b, T, k] (the rollout student's top-k ids, else the loss-time student's), ``topk_logprobs`` [b, T, k] the
    teacher's log-probs there (None when the loss does not read them) and ``token_logprobs`` [b, T] at the
    sampled tokens."""

    sparse: bool
    full: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    token_logprobs: Tensor | None = None


class TeacherTargets:
    """Where one step's teacher targets come from, decided once per step (the constructor: it runs the step's
    batched pass when one is due), handed out per micro-batch (``for_micro_batch``):

    * dense, kept by the rollout (``teacher_pass=rollout``, the teacher decoded alongside): sliced;
    * dense, ``teacher_pass=rollout`` but not kept (the student alone decoded): one batched pass for the step;
    * dense, ``teacher_pass=micro_batch``: one pass per micro-batch ([B, T, V] never exists for the step);
    * sparse (``teacher_stats=topk``): from the rollout, else one gathered pass per micro-batch at the top-k ids
      and the sampled token.
    """

    def __init__(self, teacher, rollout: Rollout, config: RolloutConfig, *, needs_teacher: bool, estimator: str,
                 topk: int, eos_ids, eos_id: int):
        self.teacher, self.rollout, self.config = teacher, rollout, config
        self.needs_teacher, self.estimator, self.topk = needs_teacher, estimator, topk
        self.eos_ids, self.eos_id = eos_ids, eos_id
        full = rollout.teacher_logprobs
        if full is None and needs_teacher and config.teacher_pass == "rollout" and not config.sparse_teacher:
            full = teacher_logprobs(teacher, rollout)
        self.full = None if full is None else self.merge(full)

    def merge(self, x: Tensor) -> Tensor:
        """One end-of-sequence event at ``eos_id`` over the last dim (idempotent; a no-op for a single EOS id):
        applied to every teacher target here, and by the loss to the student's logits."""
        return merge_eos(x, self.eos_ids, self.eos_id)

    def for_micro_batch(self, rows: slice, student_logits: Tensor) -> MicroBatchTargets:
        """The targets of the rollout's ``rows``; ``student_logits`` [b, T, V] (EOS-merged) give the top-k support
        when the rollout did not record one."""
        if self.config.sparse_teacher:
            return self._sparse(rows, student_logits)
        full = None if self.full is None else self.full[rows]
        if full is None and self.needs_teacher:  # teacher_pass=micro_batch
            full = self.merge(teacher_logprobs(self.teacher, self.rollout, rows))
        return MicroBatchTargets(sparse=False, full=full)

    def _sparse(self, rows: slice, student_logits: Tensor) -> MicroBatchTargets:
        ro = self.rollout
        ids_k = ro.topk_ids[rows] if ro.topk_ids is not None else student_logits.detach().topk(
            min(self.topk, student_logits.shape[-1]), dim=-1).indices
        t_k, t_tok = ro.teacher_topk_logprobs, ro.teacher_token_logprobs
        if t_tok is None or (t_k is None and self.estimator == "topk"):  # one gathered pass at the ids and tokens
            both = teacher_logprobs_at(self.teacher, ro, torch.cat([ids_k, ro.response_ids[rows, :, None]], -1), rows,
                                       merge=self.merge)
            t_k, t_tok = both[..., :-1], both[..., -1]
        else:
            t_k, t_tok = (None if t_k is None else t_k[rows]), t_tok[rows]
        return MicroBatchTargets(sparse=True, topk_ids=ids_k, topk_logprobs=t_k, token_logprobs=t_tok)
