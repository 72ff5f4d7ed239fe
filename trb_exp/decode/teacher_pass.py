"""Teacher passes: the teacher's log-probabilities over a rollout's response positions, computed after decoding
(when the teacher did not run during it, or its statistics were not kept). ``teacher_logprobs``: the full
[B, T, V]; ``teacher_logprobs_at``: only at given ids, with the LM head run in position chunks."""

from __future__ import annotations

import torch
from torch import Tensor

from trb_exp.decode.forward import response_logits
from trb_exp.decode.record import Rollout, positions_from_mask

__all__ = ["teacher_logprobs", "teacher_logprobs_at"]


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
