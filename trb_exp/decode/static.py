"""The static decode engine (``rollout.engine=static``): preallocated KV caches, fixed-shape decode steps,
device-side sampling, no per-token host sync.

Same contract as the eager loop (``decode/eager.py``) (same behaviour rules, same ``Rollout``), in the style
of pytorch-labs/gpt-fast:

* ``StaticLM`` (``trb_exp.decode.static_lm``) runs a Hugging Face Llama / Qwen2 / Qwen3 / Mistral causal LM (full
  attention) with the model's own weights through a small functional forward: one KV cache
  ``[B, H_kv, P + max_new, D]`` per layer allocated once, K/V of the new token written in place, a
  key-validity mask ``[B, P + max_new]`` updated in place, RoPE from a table built once per call, fused
  q|k|v and gate|up matmuls. Prefill is the same code on the prompt, each distinct prompt once.
* One decode step per model is a fixed-shape function of tensors (token, position, column): on a GPU with
  ``compile=True`` it is wrapped in ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); on a CPU the
  same arithmetic runs uncaptured on ``[B, d]`` hidden states and reads only the filled part of the cache.
  On a CPU every row's logits are bit-identical to the eager loop's (tests/test_engine.py).
* Sampling stays on the device (``torch.multinomial`` over the full batch, so the generator advances exactly
  as in the eager loop and the same seed gives the same tokens); rows that finished are replaced by a
  one-hot on the pad id instead of a Python branch. "Have all rows finished?" is read back every
  ``sync_every`` tokens (on a CPU reading it is free, so ``sync_every=None`` means every token there).
* The TRB solver runs sync-free on the device (``blending.trust_region_blend_device``).
* At every check the batch is compacted: caches, masks and positions keep only the running rows (moved to
  the front of the same buffers), so the decode cost follows the live rows, not batch x longest.
  Uncaptured (CPU) once an eighth of the decoded rows have finished, never below ``MIN_ROWS`` rows;
  captured, when the live rows fit half the batch (row counts are powers of two, one graph each).
  The token loop runs under ``torch.inference_mode`` (its outputs are cloned out of it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from trb_exp.blending import merge_eos
from trb_exp.decode.record import Rollout, positions_from_mask, topk_stats
from trb_exp.decode.static_lm import (  # noqa: F401 (re-exported)
    _LMS,
    MIN_ROWS,
    SUPPORTED,
    StaticLM,
    UnsupportedModel,
    static_lm,
)

COMPACT_DEAD_FRACTION = 0.125  # uncaptured: compact once this fraction of the decoded rows has finished


def _min_dead(n_rows: int) -> int:
    return max(1, int(n_rows * COMPACT_DEAD_FRACTION))


def _bucket(n: int, compiled: bool) -> int:
    """Batch size after compaction: a power of two under capture (few graph shapes); uncaptured, the live
    rows padded with finished ones to ``MIN_ROWS``."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1)))) if compiled else max(n, MIN_ROWS)


class _Record:
    """The rollout's [B, T, ...] outputs, preallocated, filled one column per token on the decoded rows."""

    def __init__(self, rule, B: int, T: int, V: int, device, *, pad_id: int, keep_t: bool, teacher_stats: str,
                 topk: int):
        self.full_stats = keep_t and teacher_stats == "full"
        self.tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
        self.alive_hist = torch.zeros(B, T, dtype=torch.bool, device=device)
        self.s_tok_lp = torch.zeros(B, T, device=device) if rule.needs_student else None
        # positions after a row has finished are not decoded (they are masked out of every loss and metric):
        # the teacher statistics there are the uniform distribution's, so every stored row stays normalised
        lu = -math.log(V)
        self.t_full = torch.full((B, T, V), lu, device=device) if self.full_stats else None
        self.kk = min(topk, V)
        rec_topk = teacher_stats == "topk" and rule.needs_student
        self.keep_t, self.rec_topk = keep_t, rec_topk
        self.topk_ids = torch.zeros(B, T, self.kk, dtype=torch.long, device=device) if rec_topk else None
        self.t_topk = torch.full((B, T, self.kk), lu, device=device) if (rec_topk and keep_t) else None
        self.t_tok = torch.full((B, T), lu, device=device) if keep_t and not self.full_stats else None
        self.t_ent = torch.full((B, T), -lu, device=device) if keep_t and not self.full_stats else None
        self.diags: dict[str, Tensor] = {}
        self.B, self.T = B, T

    def step(self, t: int, rows: Tensor, full: bool, tok: Tensor, tok_r: Tensor, alive: Tensor, logits: dict,
             diag: dict) -> None:
        """Column ``t``: the tokens and alive flags of all rows, the statistics of the decoded ``rows``
        (``tok_r``: their tokens)."""
        self.tokens[:, t] = tok
        self.alive_hist[:, t] = alive

        def put(buf, val):  # buf[:, t][rows] = val
            buf[:, t].copy_(val) if full else buf[:, t].index_copy_(0, rows, val)

        if self.s_tok_lp is not None:
            put(self.s_tok_lp, torch.log_softmax(logits["student"].float(), -1).gather(-1, tok_r[:, None]).squeeze(-1))
        if self.full_stats:
            put(self.t_full, torch.log_softmax(logits["teacher"].float(), -1))
        elif self.rec_topk or self.keep_t:
            stats = topk_stats(logits.get("student"), logits.get("teacher") if self.keep_t else None, tok_r, self.kk)
            for buf, val in zip((self.topk_ids, self.t_topk, self.t_tok, self.t_ent), stats):
                if buf is not None and val is not None:
                    put(buf, val)
        for k, v in diag.items():
            if k not in self.diags:
                self.diags[k] = torch.zeros(self.B, self.T, dtype=v.dtype, device=v.device)
            put(self.diags[k], v)

    def rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, t_used: int, alive: Tensor, t0: float, rule_s: float):
        # trim the columns decoded after every row had finished (sync_every > 1)
        ah = self.alive_hist
        last = int(ah.any(0).nonzero().max()) + 1 if bool(ah.any()) else 1
        T_eff = min(t_used, last)

        def cut(x):  # tensors made under inference mode are cloned out of it (they may reach autograd)
            return None if x is None else x[:, :T_eff].clone() if x.is_inference() else x[:, :T_eff]

        response, response_mask = cut(self.tokens), cut(ah)
        return Rollout(
            input_ids=torch.cat([prompt_ids, response], 1),
            attention_mask=torch.cat([prompt_mask.long(), response_mask.long()], 1),
            response_mask=response_mask, prompt_len=prompt_ids.shape[1], teacher_logprobs=cut(self.t_full),
            token_logprobs_student=cut(self.s_tok_lp), finished=(~alive).clone(),
            diagnostics={k: cut(v) for k, v in self.diags.items()}, decode_s=time.perf_counter() - t0,
            rule_s=rule_s, topk_ids=cut(self.topk_ids), teacher_topk_logprobs=cut(self.t_topk),
            teacher_token_logprobs=cut(self.t_tok), teacher_entropy=cut(self.t_ent),
        )


def _prefill(models: dict, prompt_ids: Tensor, mask: Tensor, pos0: Tensor, device) -> dict:
    """Every model's last-prompt-token logits [B, V], each distinct prompt run once (OPD's
    ``rollouts_per_prompt`` copies share their prefill; the copies' caches are filled from it)."""
    B = prompt_ids.shape[0]
    first: dict = {}  # distinct prompt (ids and mask) -> (its index, its first row)
    keys = torch.cat([prompt_ids, mask], 1).tolist()
    rows = [first.setdefault(tuple(r), (len(first), b))[0] for b, r in enumerate(keys)]
    if len(first) == B or len(first) < MIN_ROWS:
        return {name: m.prefill(prompt_ids, mask, pos0).to(device) for name, m in models.items()}
    take = torch.tensor([b for _, b in first.values()], device=device)
    ids_u, mask_u, pos_u = (x.index_select(0, take) for x in (prompt_ids, mask, pos0))
    rows_t = torch.tensor(rows, device=device)
    return {name: m.prefill(ids_u, mask_u, pos_u, rows_t).to(device) for name, m in models.items()}


def _compact(models: dict, alive: Tensor, rows: Tensor, logits: dict, n_alive: int, compiled: bool, upto: int):
    """Keep the running rows (padded with finished ones to the captured bucket size): the models' caches,
    the logits and the ``rows`` map. Returns the new (rows, logits) and the kept positions in the old rows."""
    alive_r = alive.index_select(0, rows)
    keep_local = alive_r.nonzero().squeeze(-1)
    n_new = _bucket(n_alive, compiled)
    if n_new > keep_local.numel():  # pad the bucket with finished rows
        dead = (~alive_r).nonzero().squeeze(-1)[: n_new - keep_local.numel()]
        keep_local = torch.cat([keep_local, dead]).sort().values
    for m in models.values():
        m.compact(keep_local, None if m.compiled else upto)
    return rows.index_select(0, keep_local), {k: v.index_select(0, keep_local) for k, v in logits.items()}, keep_local


def _behaviour(rule, logits: dict, rows: Tensor, full: bool, B: int, V: int, uses_gen: bool):
    """The rule on the decoded rows: (log-probs, diagnostics) for ``rows``. A rule that samples itself
    (SKD) sees every row (finished ones as zero logits), as in the eager loop, so its generator advances
    the same way."""
    if uses_gen and not full:
        lg = {k: v.new_zeros(B, V).index_copy_(0, rows, v) for k, v in logits.items()}
    else:
        lg = logits
    behavior, diag = rule(lg.get("student"), lg.get("teacher"))
    behavior = torch.nan_to_num(behavior, nan=float("-inf"))
    if uses_gen and not full:
        behavior = behavior.index_select(0, rows)
        diag = {k: v.index_select(0, rows) for k, v in diag.items()}
    return behavior, diag


@torch.no_grad()
def sample_static(
    student,
    teacher,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    rule,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    keep_teacher_logprobs: bool = True,
    eos_ids: Sequence[int] = (),
    sync_every: int | None = None,
    compile: bool = False,
    compact: bool = True,
    teacher_stats: str = "full",
    topk: int = 16,
    solver_iters: int | None = None,
    trace=None,
):
    """``decode.backend.sample`` on the static engine (see the module docstring). Extra knobs: ``sync_every``
    (tokens between reads of "all rows finished?"; None = 1 on CPU, 16 on GPU), ``compile`` (capture the
    decode steps on a GPU), ``compact`` (drop finished rows at the checks), ``teacher_stats`` ("full":
    [B, T, V] teacher log-probs as the eager loop; "topk": only the student's top-``topk`` support, the
    sampled token and the teacher entropy), ``solver_iters`` (the TRB solver's fixed iteration budget;
    None = device-side stopping). ``trace(t, rows, logits)``, when given, sees the (EOS-merged) next-token
    logits of the decoded ``rows`` at every step (tests)."""
    B, P = prompt_ids.shape
    device = prompt_ids.device
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 16
    rule = rule.for_static_engine(solver_iters)  # e.g. the trust-region solver's sync-free twin
    mask = prompt_mask.long()
    pos0 = positions_from_mask(mask)
    models = {}
    if rule.needs_student:
        models["student"] = static_lm(student, B, P + max_new_tokens, compile=compile)
    if rule.needs_teacher:
        models["teacher"] = static_lm(teacher, B, P + max_new_tokens, compile=compile)

    t0 = time.perf_counter()
    with torch.inference_mode():  # fewer dispatch costs per op; the outputs are cloned out of it (rec.rollout)
        logits = _prefill(models, prompt_ids, mask, pos0, device)
        V = next(iter(logits.values())).shape[-1]
        rec = _Record(rule, B, max_new_tokens, V, device, pad_id=pad_id,
                      keep_t=keep_teacher_logprobs and rule.needs_teacher, teacher_stats=teacher_stats, topk=topk)
        loop = _Loop(models, rule, rec, generator=generator, eos_id=eos_id, pad_id=pad_id, eos_ids=eos_ids,
                     sync_every=sync_every, compact=compact, trace=trace)
        t_used, alive = loop.run(logits, pos0[:, -1] + 1, P)
    return rec.rollout(prompt_ids, prompt_mask, t_used, alive, t0, loop.rule_s)


class _Loop:
    """The token loop of ``sample_static``: rule, sampling, record, compaction, one decode step per model."""

    def __init__(self, models, rule, rec, *, generator, eos_id, pad_id, eos_ids, sync_every, compact, trace):
        self.models, self.rule, self.rec, self.generator = models, rule, rec, generator
        self.eos_id, self.pad_id, self.sync_every, self.compact, self.trace = eos_id, pad_id, sync_every, compact, trace
        self.compiled = any(m.compiled for m in models.values())
        device = rec.tokens.device
        self.other_eos = [int(i) for i in dict.fromkeys(eos_ids) if int(i) != int(eos_id)]
        self.all_eos = [int(eos_id), *self.other_eos]
        self.other_eos_t = torch.tensor(self.other_eos, dtype=torch.long, device=device)
        self.uses_gen = getattr(rule, "generator", None) is not None
        self.rule_s = 0.0

    def _sample(self, t: int, logits: dict, rows: Tensor, probs: Tensor, alive: Tensor):
        """Column ``t``'s tokens [B] (pads on finished rows) and those of the decoded rows, recorded with the
        rule's statistics."""
        B, V = probs.shape
        full = rows.numel() == B
        if self.trace is not None:
            self.trace(t, rows, logits)
        t_rule = time.perf_counter()
        behavior, diag = _behaviour(self.rule, logits, rows, full, B, V, self.uses_gen)
        self.rule_s += time.perf_counter() - t_rule
        # the generator advances over all B rows, as in the eager loop (rows not decoded draw the pad)
        tok = torch.multinomial(behavior.exp() if full else probs.index_copy_(0, rows, behavior.exp()), 1,
                                generator=self.generator).squeeze(-1)
        if self.other_eos:
            tok = torch.where(torch.isin(tok, self.other_eos_t), torch.full_like(tok, self.eos_id), tok)
        tok = torch.where(alive, tok, self.pad_id)
        tok_r = tok if full else tok.index_select(0, rows)
        self.rec.step(t, rows, full, tok, tok_r, alive, logits, diag)
        return tok, tok_r

    def run(self, logits: dict, pos_r: Tensor, P: int):
        """Decode up to T tokens from the prefill's ``logits`` (next positions ``pos_r`` [B]); returns the
        number of columns decoded and the final alive flags [B]."""
        rec, models = self.rec, self.models
        B, T, V = rec.B, rec.T, next(iter(logits.values())).shape[-1]
        device = rec.tokens.device
        alive = torch.ones(B, dtype=torch.bool, device=device)  # over all B rows
        rows = torch.arange(B, device=device)  # the batch rows still decoded (after compaction)
        pad_probs = torch.zeros(B, V, device=device)
        pad_probs[:, self.pad_id] = 1.0
        probs = pad_probs.clone()
        t = -1
        for t in range(T):
            if self.other_eos:
                logits = {k: merge_eos(v, self.all_eos, self.eos_id) for k, v in logits.items()}
            tok, tok_r = self._sample(t, logits, rows, probs, alive)
            alive_prev, alive = alive, alive & (tok != self.eos_id)
            if t + 1 == T:
                break
            if (t + 1) % self.sync_every == 0:  # the only host sync of the loop
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                # uncaptured (CPU): drop finished rows once an eighth of the decoded rows have finished (a copy
                # of the filled part of each cache); captured: only when the batch halves (a new graph per
                # power-of-two size)
                n_rows, c = rows.numel(), self.compiled
                target = _bucket(n_alive, c)
                if self.compact and (target <= n_rows // 2 if c else n_rows - target >= _min_dead(n_rows)):
                    rows, logits, kept = _compact(models, alive, rows, logits, n_alive, c, P + t + 1)
                    tok_r, pos_r = tok_r.index_select(0, kept), pos_r.index_select(0, kept)
                    probs.copy_(pad_probs)
            alive_r = alive_prev if rows.numel() == B else alive_prev.index_select(0, rows)
            logits = {name: m.decode(tok_r, pos_r, P + t, alive_r).to(device) for name, m in models.items()}
            pos_r = pos_r + 1
        return t + 1, alive
