"""Warm starts that run once before training step 0 (``sft_warmup``).

``sft_warm_start`` samples ``n`` teacher responses per prompt with the same decode loop as training
(``TeacherSampler``: the student is never called), then fits the student to them with cross-entropy for
``M`` optimizer updates (one pass over the responses, split into M shuffled mini-batches; each
update is normalised by its response tokens). Its optimizer is its own, so OPD then starts from the
SFT checkpoint with a fresh AdamW and learning-rate warmup.
"""

from __future__ import annotations

import math
import random

import torch

from trb_exp import losses
from trb_exp.blending import merge_eos
from trb_exp.data import encode_prompts, pad_right
from trb_exp.distributed import DistContext
from trb_exp.optim import accumulate_step, adamw_from_config
from trb_exp.decode.backend import sample
from trb_exp.decode.forward import response_logits
from trb_exp.rules import TeacherSampler


def pack(tok, prompts: list[str], responses: list[list[int]], device):
    """Left-padded prompts followed by right-padded responses: (input_ids, attention_mask,
    response_ids, response_mask, prompt_len), the layout of a ``Rollout``."""
    ids, mask = encode_prompts(tok, prompts, device)
    resp, rmask = pad_right(responses, tok.pad_token_id, ids.device)
    return torch.cat([ids, resp], 1), torch.cat([mask.long(), rmask.long()], 1), resp, rmask, ids.shape[1]


def sft_warm_start(student, teacher, tok, prompts: list[str], answers: list[str], grade, *, n_samples: int,
                   updates: int, cfg, logger, generator, eos_id: int, eos_ids=(), dist: DistContext | None = None,
                   model=None) -> list[dict]:
    """SFT ``student`` on ``n_samples`` teacher responses per prompt for ``updates`` updates. Logs one
    ``sft/*`` row per update (at step 0) and returns the rows. ``eos_id``/``eos_ids``: as in
    ``decode.backend.sample`` (one merged end-of-sequence event, for the CE too).

    Under torchrun (``dist``; ``model``: the DDP / FSDP2-wrapped student the losses run through) every rank
    decodes its contiguous share of the prompts with its own sampling stream, the responses are gathered on
    every rank in rank order, and each update's mini-batch (the single-process one) is split over the ranks:
    each backpropagates its block, normalised by the mini-batch's tokens over all ranks, gradients are
    synchronised on the last micro-batch (every rank runs the same number of them)."""
    tr, op = cfg.trainer, cfg.optim
    dist, model = dist or DistContext(), model if model is not None else student
    device = next(student.parameters()).device
    # 1. teacher responses (this rank's share of the prompts, gathered), 2. M cross-entropy updates on them
    rows, teacher_reward = _teacher_responses(teacher, tok, prompts, answers, grade, n_samples=n_samples,
                                              tr=tr, generator=generator, eos_id=eos_id, eos_ids=eos_ids,
                                              dist=dist, device=device)

    # the updates: one shuffled pass, split into M mini-batches (cycling if M > rows)
    opt, sched = adamw_from_config(student.parameters(), op)
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    per_update = math.ceil(len(rows) / updates)
    mb = tr.micro_batch_size
    student.train()
    logged = []
    for u in range(updates):
        batch = [rows[order[(u * per_update + j) % len(rows)]] for j in range(per_update)]
        n_tokens = sum(len(r) for _, r in batch)
        norm = n_tokens / dist.world if dist.active else n_tokens  # DDP / FSDP average gradients over ranks
        lo, hi = dist.block(len(batch))
        micro = [_ce_loss(model, tok, batch[s : min(s + mb, hi)], norm, device, eos_ids, eos_id)
                 for s in range(lo, hi, mb)]
        if dist.active:  # the same number of micro-batches on every rank (FSDP2 gathers at every forward)
            n_micro = math.ceil(math.ceil(len(batch) / dist.world) / mb)
            micro += [_ce_loss(model, tok, batch[:1], norm, device, eos_ids, eos_id, weight=0.0)] * (n_micro - len(micro))
        total, grad_norm = accumulate_step(model, opt, sched, micro, grad_clip=op.grad_clip)
        if dist.active:
            total = dist.all_sum(total) / dist.world
        row = {"sft/loss": total, "sft/update": u + 1, "sft/grad_norm": grad_norm.item(),
               "sft/responses": len(rows), "sft/teacher_reward": teacher_reward}
        logger.log(row, 0)
        logged.append(row)
    if dist.is_main:
        print(f"[sft] {len(rows)} teacher responses for {len(prompts)} prompts (reward {teacher_reward:.3f}); "
              f"{updates} updates, loss {logged[0]['sft/loss']:.3f} -> {logged[-1]['sft/loss']:.3f}", flush=True)
    return logged


def _teacher_responses(teacher, tok, prompts, answers, grade, *, n_samples, tr, generator, eos_id, eos_ids, dist,
                       device) -> tuple[list[tuple[str, list[int]]], float]:
    """``n_samples`` teacher responses per prompt, decoded one training step's worth of prompts at a time
    (under torchrun: this rank's share, then gathered on every rank in rank order), as (prompt, response ids)
    rows, and the teacher's mean reward on them."""
    mine = dist.shard(list(range(len(prompts))), "method.sft_steps x trainer.prompts_per_step")
    per_chunk = max(1, tr.prompts_per_step // dist.world)
    rows: list[tuple[str, list[int]]] = []
    reward = 0
    for s in range(0, len(mine), per_chunk):
        chunk = [i for i in mine[s : s + per_chunk] for _ in range(n_samples)]
        ids, mask = encode_prompts(tok, [prompts[i] for i in chunk], device)
        ro = sample(None, teacher, ids, mask, TeacherSampler(tr.temperature), max_new_tokens=tr.max_new_tokens,
                    eos_id=eos_id, pad_id=tok.pad_token_id, generator=generator, eos_ids=eos_ids,
                    keep_teacher_logprobs=False)
        texts = tok.batch_decode(ro.response_ids, skip_special_tokens=True)
        for i, r, m, text in zip(chunk, ro.response_ids, ro.response_mask, texts):
            rows.append((prompts[i], r[m].tolist()))
            reward += grade(text, answers[i])
    if dist.active:  # every rank holds all responses, in rank order (the prompts' order)
        rows = [row for part in dist.gather(rows) for row in part]
        reward = dist.all_sum(float(reward))
    return rows, reward / len(rows)


def _ce_loss(model, tok, rows, n_tokens, device, eos_ids, eos_id, weight: float | None = None):
    """The cross-entropy of ``rows`` (prompt, response ids) as its share of a token mean over ``n_tokens``
    (``weight=0``: a micro-batch that only keeps a rank in step with the others)."""
    def loss_of():
        ids, attn, resp, rmask, P = pack(tok, [p for p, _ in rows], [r for _, r in rows], device)
        ce = losses.cross_entropy(merge_eos(response_logits(model, ids, attn, P), eos_ids, eos_id), resp)
        loss = losses.masked_token_mean(ce, rmask, n_tokens)
        return loss if weight is None else loss * weight
    return loss_of
