"""Warm starts that run once before training step 0 (``sft_warmup``).

``sft_warm_start`` samples ``n`` teacher responses per prompt with the same decode loop as training
(``TeacherRule``: the student is never called), then fits the student to them with cross-entropy for
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
from trb_exp.optim import adamw_from_config
from trb_exp.rollout import TeacherRule, response_logits, sample


def pack(tok, prompts: list[str], responses: list[list[int]], device):
    """Left-padded prompts followed by right-padded responses: (input_ids, attention_mask,
    response_ids, response_mask, prompt_len), the layout of a ``Rollout``."""
    ids, mask = encode_prompts(tok, prompts, device)
    resp, rmask = pad_right(responses, tok.pad_token_id, ids.device)
    return torch.cat([ids, resp], 1), torch.cat([mask.long(), rmask.long()], 1), resp, rmask, ids.shape[1]


def sft_warm_start(student, teacher, tok, prompts: list[str], answers: list[str], grade, *, n_samples: int,
                   updates: int, cfg, logger, generator, eos_id: int, eos_ids=()) -> list[dict]:
    """SFT ``student`` on ``n_samples`` teacher responses per prompt for ``updates`` updates. Logs one
    ``sft/*`` row per update (at step 0) and returns the rows. ``eos_id``/``eos_ids``: as in
    ``rollout.sample`` (one merged end-of-sequence event, for the CE too)."""
    tr, op = cfg.trainer, cfg.optim
    device = next(student.parameters()).device
    # 1. teacher responses, decoded one training step's worth of prompts at a time
    rows: list[tuple[str, list[int]]] = []
    reward = 0
    for s in range(0, len(prompts), tr.prompts_per_step):
        chunk = [i for i in range(s, min(s + tr.prompts_per_step, len(prompts))) for _ in range(n_samples)]
        ids, mask = encode_prompts(tok, [prompts[i] for i in chunk], device)
        ro = sample(None, teacher, ids, mask, TeacherRule(tr.temperature), max_new_tokens=tr.max_new_tokens,
                    eos_id=eos_id, pad_id=tok.pad_token_id, generator=generator, eos_ids=eos_ids,
                    keep_teacher_logprobs=False)
        texts = tok.batch_decode(ro.response_ids, skip_special_tokens=True)
        for i, r, m, text in zip(chunk, ro.response_ids, ro.response_mask, texts):
            rows.append((prompts[i], r[m].tolist()))
            reward += grade(text, answers[i])
    teacher_reward = reward / len(rows)

    # 2. M cross-entropy updates: one shuffled pass, split into M mini-batches (cycling if M > rows)
    opt, sched = adamw_from_config(student.parameters(), op)
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    per_update = math.ceil(len(rows) / updates)
    student.train()
    logged = []
    for u in range(updates):
        batch = [rows[order[(u * per_update + j) % len(rows)]] for j in range(per_update)]
        n_tokens = sum(len(r) for _, r in batch)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for s in range(0, len(batch), tr.micro_batch_size):
            mb = batch[s : s + tr.micro_batch_size]
            ids, attn, resp, rmask, P = pack(tok, [p for p, _ in mb], [r for _, r in mb], device)
            ce = losses.cross_entropy(merge_eos(response_logits(student, ids, attn, P), eos_ids, eos_id), resp)
            loss = losses.masked_token_mean(ce, rmask, n_tokens)
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), op.grad_clip)
        opt.step()
        sched.step()
        row = {"sft/loss": total, "sft/update": u + 1, "sft/grad_norm": grad_norm.item(),
               "sft/responses": len(rows), "sft/teacher_reward": teacher_reward}
        logger.log(row, 0)
        logged.append(row)
    print(f"[sft] {len(rows)} teacher responses for {len(prompts)} prompts (reward {teacher_reward:.3f}); "
          f"{updates} updates, loss {logged[0]['sft/loss']:.3f} -> {logged[-1]['sft/loss']:.3f}", flush=True)
    return logged
