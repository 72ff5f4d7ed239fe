"""The static decode engine (``rollout.engine=static``): preallocated KV caches, fixed-shape decode steps,
device-side sampling, no per-token host sync.

Same contract as the eager loop in ``rollout.sample`` (same behaviour rules, same ``Rollout``), in the style
of pytorch-labs/gpt-fast:

* ``StaticLM`` runs a Hugging Face Llama / Qwen2 / Qwen3 / Mistral causal LM (full attention) with the
  model's own weights through a small functional forward: one KV cache ``[B, H_kv, P + max_new, D]`` per
  layer allocated once, K/V of the new token written in place, a key-validity mask ``[B, P + max_new]``
  updated in place, RoPE from a table built once per call. Prefill is the same code on the prompt.
* One decode step per model is a fixed-shape function of tensors (token, position, column): on a GPU with
  ``compile=True`` it is wrapped in ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); on a CPU the
  same code runs uncaptured and reads only the filled part of the cache.
* Sampling stays on the device (``torch.multinomial`` over the full batch, so the generator advances exactly
  as in the eager loop and the same seed gives the same tokens); rows that finished are replaced by a
  one-hot on the pad id instead of a Python branch. "Have all rows finished?" is read back every
  ``sync_every`` tokens (on a CPU reading it is free, so ``sync_every=None`` means every token there).
* The TRB solver runs sync-free on the device (``blending.trust_region_blend_device``).
* At every check the batch is compacted: caches, masks and positions keep only the running rows (moved to
  the front of the same buffers), so the decode cost follows the live rows, not batch x longest.
  Uncaptured (CPU) as soon as a row has finished; captured, when the live rows fit half the batch
  (row counts are powers of two, one graph each).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trb_exp.blending import merge_eos

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")


class UnsupportedModel(ValueError):
    pass


def _check_supported(model) -> None:
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        raise UnsupportedModel(f"rollout.engine=static supports {', '.join(SUPPORTED)} models, not {mt!r}: "
                               "use rollout.engine=eager")
    if getattr(cfg, "use_sliding_window", False) or (getattr(cfg, "sliding_window", None) and mt == "mistral"):
        raise UnsupportedModel("rollout.engine=static: sliding-window attention is not supported; use rollout.engine=eager")
    rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", "default")
    if rope not in ("default", "linear", "llama3", "yarn"):
        raise UnsupportedModel(f"rollout.engine=static: rope type {rope!r} is position-dependent at run time; "
                               "use rollout.engine=eager")


def _rms(x: Tensor, norm) -> Tensor:
    """Exactly ``LlamaRMSNorm`` / ``Qwen3RMSNorm`` (float32: torch's fused kernel, bit-identical on CPU)."""
    dt = x.dtype
    if dt == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dt)


def _rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = cat(-x2, x1) = roll(x) * (-1, 1):
    the sign lives in ``sin_signed`` (exact in floating point)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class StaticLM:
    """A decoder-only LM with a preallocated KV cache for ``batch`` rows of ``max_len`` tokens."""

    def __init__(self, model, batch: int, max_len: int, *, compile: bool = False):
        _check_supported(model)
        self.lm_head = model.lm_head  # not the model itself: static_lm caches by a weak reference to it
        self.inner = model.model
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_kv = cfg.num_key_value_heads
        self.n_heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = list(self.inner.layers)
        self.scaling = self.layers[0].self_attn.scaling
        self.vocab = getattr(model, "trb_vocab_size", None)
        self.max_len = max_len
        self.batch = batch
        shape = (batch, self.n_kv, max_len, self.head_dim)
        self.k_full = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_full = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.key_valid_full = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)
        self._views: dict = {}  # n rows -> the first n rows of every buffer (fixed objects and addresses)
        dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.inner.rotary_emb(dummy, torch.arange(max_len, device=self.device)[None])
        d = self.head_dim // 2
        self.cos, self.sin = cos[0], torch.cat([-sin[0, :, :d], sin[0, :, d:]], -1)  # [max_len, D], model dtype
        self.w = [self._layer_weights(layer) for layer in self.layers]
        self.compiled = compile and self.device.type == "cuda"
        self._decode = self._decode_impl
        self.reset()
        if self.compiled:
            self._decode = torch.compile(self._decode_impl, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def _set_rows(self, n: int) -> None:
        """Decode the first ``n`` rows of the buffers from now on (views created once per n, so a captured
        step sees the same tensors, at the same addresses, every time)."""
        if n not in self._views:
            views = ([x[:n] for x in self.k_full], [x[:n] for x in self.v_full], self.key_valid_full[:n])
            mark = None
            if self.compiled:
                import torch._dynamo

                mark = getattr(torch._dynamo, "mark_static_address", None)
            if mark is not None:  # updated in place inside the captured step
                for x in (*views[0], *views[1], views[2], self.cos, self.sin):
                    mark(x)
            self._views[n] = views
        self.k, self.v, self.key_valid = self._views[n]

    def reset(self) -> None:
        """Ready for a new batch: all rows, no valid key (stale K/V behind a False mask weigh exactly 0)."""
        self._set_rows(self.batch)
        self.key_valid.zero_()

    @staticmethod
    def _layer_weights(layer):
        a, m = layer.self_attn, layer.mlp
        simple_mlp = type(m).__name__.endswith("MLP") and hasattr(m, "gate_proj") and not getattr(m, "mlp_bias", False)
        return dict(
            q=(a.q_proj.weight, a.q_proj.bias), k=(a.k_proj.weight, a.k_proj.bias),
            v=(a.v_proj.weight, a.v_proj.bias), o=(a.o_proj.weight, a.o_proj.bias),
            mlp=(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight) if simple_mlp and
            getattr(m, "gate_proj").bias is None and m.act_fn.__class__.__name__ == "SiLUActivation" else None,
        )

    def _attend(self, q: Tensor, kc: Tensor, vc: Tensor, mask: Tensor) -> Tensor:
        """softmax(q k^T * scale + mask) v with torch's SDPA, as the HF models call it (a hand-written bmm
        version is ~1.5x faster on tiny CPU shapes but moves logits by ~1e-5: not the eager numbers)."""
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=self.scaling,
                                              enable_gqa=self.n_heads != self.n_kv)

    # ------------------------------------------------------------------ forward pieces
    def _attn_layer(self, i: int, layer, h: Tensor, cos: Tensor, sin: Tensor, write, mask: Tensor, kv_len) -> Tensor:
        a, w = layer.self_attn, self.w[i]
        B, S, _ = h.shape
        x = _rms(h, layer.input_layernorm)
        q = F.linear(x, *w["q"]).view(B, S, -1, self.head_dim)
        k = F.linear(x, *w["k"]).view(B, S, -1, self.head_dim)
        v = F.linear(x, *w["v"]).view(B, S, -1, self.head_dim)
        if hasattr(a, "q_norm"):  # Qwen3: per-head RMSNorm of q and k
            q, k = _rms(q, a.q_norm), _rms(k, a.k_norm)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        write(self.k[i], k)
        write(self.v[i], v)
        kc, vc = self.k[i], self.v[i]
        if kv_len is not None:
            kc, vc = kc[:, :, :kv_len], vc[:, :, :kv_len]
        o = self._attend(q, kc, vc, mask)
        h = h + F.linear(o.transpose(1, 2).reshape(B, S, -1), *w["o"])
        x = _rms(h, layer.post_attention_layernorm)
        if w["mlp"] is None:
            return h + layer.mlp(x)
        wg, wu, wd = w["mlp"]
        return h + F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    def _logits(self, h: Tensor) -> Tensor:
        logits = self.lm_head(_rms(h, self.inner.norm))
        if self.vocab is not None:
            logits = logits[..., : self.vocab]
        return logits

    @torch.no_grad()
    def prefill(self, ids: Tensor, prompt_mask: Tensor, pos: Tensor) -> Tensor:
        """The prompt [B, P] (left padded) into columns 0..P-1 of the cache; last-token logits [B, V]."""
        B, P = ids.shape
        ids, prompt_mask, pos = ids.to(self.device), prompt_mask.to(self.device), pos.to(self.device)
        self.key_valid[:, :P] = prompt_mask.bool()
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()
        # every query also sees itself, so the (unused) rows of left padding stay finite
        mask = (causal & self.key_valid[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=self.device)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]

        def write(cache, x):
            cache[:, :, :P] = x

        h = self.inner.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            h = self._attn_layer(i, layer, h, cos, sin, write, mask, P)
        return self._logits(h[:, -1])

    def _decode_impl(self, tok: Tensor, pos: Tensor, col: Tensor, alive: Tensor, kv_len=None) -> Tensor:
        """One token per row: ``tok`` [B] at positions ``pos`` [B] into cache column ``col`` (a 1-element
        tensor: the same column for every row); ``alive`` [B] marks the column valid. Logits [B, V]."""
        self.key_valid.index_copy_(1, col, alive[:, None])
        mask = self.key_valid[:, None, None, :] if kv_len is None else self.key_valid[:, None, None, :kv_len]
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]

        def write(cache, x):
            cache.index_copy_(2, col, x)

        h = self.inner.embed_tokens(tok[:, None])
        for i, layer in enumerate(self.layers):
            h = self._attn_layer(i, layer, h, cos, sin, write, mask, kv_len)
        return self._logits(h[:, -1])

    @torch.no_grad()
    def decode(self, tok: Tensor, pos: Tensor, col: int, alive: Tensor) -> Tensor:
        tok, pos, alive = tok.to(self.device), pos.to(self.device), alive.to(self.device)
        col_t = torch.full((1,), col, dtype=torch.long, device=self.device)
        if self.compiled:  # fixed shapes: attend over the whole (masked) cache
            return self._decode(tok, pos, col_t, alive).clone()
        return self._decode(tok, pos, col_t, alive, col + 1)

    def compact(self, rows: Tensor, upto: int | None = None) -> None:
        """Keep only ``rows`` (ascending indices into the current batch): they move to the front of every
        buffer, in place (a captured step gets one graph per row count: powers of two, see ``_bucket``).
        ``upto``: only the first ``upto`` cache columns hold anything yet (uncaptured: copy just those)."""
        rows = rows.to(self.device)
        n = rows.numel()
        for x in (*self.k, *self.v):
            x[:n, :, :upto] = x[:, :, :upto].index_select(0, rows)
        if upto is not None and not self.compiled:
            self.key_valid[:, upto:] = False
        self.key_valid[:n] = self.key_valid.index_select(0, rows)
        self._set_rows(n)


_LMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def static_lm(model, batch: int, max_len: int, *, compile: bool = False) -> StaticLM:
    """The model's ``StaticLM`` for this shape, reused across calls (buffers, views and captured graphs);
    one per model: a new shape replaces the old one. The length is rounded up (to a multiple of 256 when
    captured, 64 otherwise) so that prompts of varying length share buffers and graphs."""
    step = 256 if compile and next(model.parameters()).device.type == "cuda" else 64
    max_len = -(-max_len // step) * step
    key = (batch, max_len, bool(compile))
    lm = _LMS.get(model)
    if lm is None or lm[0] != key:
        lm = _LMS[model] = (key, None)  # drop the old buffers first
        lm = _LMS[model] = (key, StaticLM(model, batch, max_len, compile=compile))
    else:
        lm[1].reset()
    return lm[1]


def _bucket(n: int, compiled: bool) -> int:
    """Batch size after compaction: exact on CPU; a power of two under capture (few graph shapes)."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1)))) if compiled else n


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
    """``rollout.sample`` on the static engine (see the module docstring). Extra knobs: ``sync_every``
    (tokens between reads of "all rows finished?"; None = 1 on CPU, 16 on GPU), ``compile`` (capture the
    decode steps on a GPU), ``compact`` (drop finished rows at the checks), ``teacher_stats`` ("full":
    [B, T, V] teacher log-probs as the eager loop; "topk": only the student's top-``topk`` support, the
    sampled token and the teacher entropy), ``solver_iters`` (the TRB solver's fixed iteration budget;
    None = device-side stopping). ``trace(t, rows, logits)``, when given, sees the (EOS-merged) next-token
    logits of the decoded ``rows`` at every step (tests)."""
    from trb_exp.rollout import Rollout, positions_from_mask

    B, P = prompt_ids.shape
    device = prompt_ids.device
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 16
    rule = rule.for_static_engine(solver_iters)  # e.g. the trust-region solver's sync-free twin
    mask = prompt_mask.long()
    pos0 = positions_from_mask(mask)
    max_len = P + max_new_tokens
    models = {}
    if rule.needs_student:
        models["student"] = static_lm(student, B, max_len, compile=compile)
    if rule.needs_teacher:
        models["teacher"] = static_lm(teacher, B, max_len, compile=compile)
    compiled = any(m.compiled for m in models.values())
    other_eos = [int(i) for i in dict.fromkeys(eos_ids) if int(i) != int(eos_id)]
    all_eos = [int(eos_id), *other_eos]
    other_eos_t = torch.tensor(other_eos, dtype=torch.long, device=device)
    keep_t = keep_teacher_logprobs and rule.needs_teacher
    full_stats = keep_t and teacher_stats == "full"

    t0 = time.perf_counter()
    logits = {name: m.prefill(prompt_ids, mask, pos0).to(device) for name, m in models.items()}
    V = next(iter(logits.values())).shape[-1]
    T = max_new_tokens
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    alive_hist = torch.zeros(B, T, dtype=torch.bool, device=device)
    s_tok_lp = torch.zeros(B, T, device=device) if rule.needs_student else None
    t_full = torch.zeros(B, T, V, device=device) if full_stats else None
    kk = min(topk, V)
    rec_topk = teacher_stats == "topk" and rule.needs_student
    topk_ids = torch.zeros(B, T, kk, dtype=torch.long, device=device) if rec_topk else None
    t_topk = torch.zeros(B, T, kk, device=device) if (rec_topk and keep_t) else None
    t_tok = torch.zeros(B, T, device=device) if keep_t and not full_stats else None
    t_ent = torch.zeros(B, T, device=device) if keep_t and not full_stats else None
    diags: dict[str, Tensor] = {}
    alive = torch.ones(B, dtype=torch.bool, device=device)  # over all B rows
    rows = torch.arange(B, device=device)  # the batch rows still decoded (after compaction)
    n_rows = B
    next_pos = pos0[:, -1] + 1
    pad_row = torch.full((V,), float("-inf"), device=device)
    pad_row[pad_id] = 0.0
    uses_gen = getattr(rule, "generator", None) is not None
    rule_s, t_used = 0.0, 0
    for t in range(T):
        if other_eos:
            logits = {k: merge_eos(v, all_eos, eos_id) for k, v in logits.items()}
        full = n_rows == B
        if trace is not None:
            trace(t, rows, logits)
        if uses_gen and not full:  # a rule that samples itself sees every row, as in the eager loop
            lg = {k: torch.zeros(B, V, dtype=v.dtype, device=device).index_copy_(0, rows, v) for k, v in logits.items()}
        else:
            lg = logits
        t_rule = time.perf_counter()
        behavior, diag = rule(lg.get("student"), lg.get("teacher"))
        rule_s += time.perf_counter() - t_rule
        behavior = torch.nan_to_num(behavior, nan=float("-inf"))
        if uses_gen and not full:
            behavior = behavior.index_select(0, rows)
            diag = {k: v.index_select(0, rows) for k, v in diag.items()}
        if full:
            probs = behavior.exp()
        else:  # the finished rows draw a pad: the generator advances over all B rows, as in the eager loop
            probs = pad_row.exp().expand(B, V).clone().index_copy_(0, rows, behavior.exp())
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if other_eos:
            tok = torch.where(torch.isin(tok, other_eos_t), torch.full_like(tok, eos_id), tok)
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        tokens[:, t] = tok
        alive_hist[:, t] = alive
        tok_r = tok if full else tok.index_select(0, rows)
        if s_tok_lp is not None:
            s_lp = torch.log_softmax(logits["student"].float(), -1).gather(-1, tok_r[:, None]).squeeze(-1)
            s_tok_lp[:, t].index_copy_(0, rows, s_lp) if not full else s_tok_lp[:, t].copy_(s_lp)
        if full_stats:
            lt = torch.log_softmax(logits["teacher"].float(), -1)
            t_full[:, t].index_copy_(0, rows, lt) if not full else t_full[:, t].copy_(lt)
        elif rec_topk or keep_t:
            ids, tv, tt, ent = topk_stats(logits.get("student"), logits.get("teacher") if keep_t else None, tok_r, kk)
            for buf, val in ((topk_ids, ids), (t_topk, tv), (t_tok, tt), (t_ent, ent)):
                if buf is not None and val is not None:
                    buf[:, t].index_copy_(0, rows, val)
        for k, v in diag.items():
            if k not in diags:
                diags[k] = torch.zeros(B, T, dtype=v.dtype, device=device)
            diags[k][:, t].index_copy_(0, rows, v)
        alive = alive & (tok != eos_id)
        t_used = t + 1
        if t + 1 == T:
            break
        if (t + 1) % sync_every == 0:  # the only host sync of the loop
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            # uncaptured (CPU): drop finished rows as soon as there are any (a copy of the filled part of
            # each cache); captured: only when the batch halves (a new graph per power-of-two size)
            if compact and (_bucket(n_alive, compiled) <= n_rows // 2 if compiled else n_alive < n_rows):
                keep_local = alive.index_select(0, rows).nonzero().squeeze(-1)
                n_new = _bucket(n_alive, compiled)
                if n_new > keep_local.numel():  # pad the bucket with finished rows
                    dead = (~alive.index_select(0, rows)).nonzero().squeeze(-1)[: n_new - keep_local.numel()]
                    keep_local = torch.cat([keep_local, dead]).sort().values
                for m in models.values():
                    m.compact(keep_local, None if m.compiled else P + t + 1)
                logits = {k: v.index_select(0, keep_local) for k, v in logits.items()}
                rows = rows.index_select(0, keep_local)
                n_rows = rows.numel()
        alive_r = alive_hist[:, t].index_select(0, rows) if n_rows != B else alive_hist[:, t]
        pos_r = next_pos.index_select(0, rows) if n_rows != B else next_pos
        tok_r = tok.index_select(0, rows) if n_rows != B else tok
        logits = {name: m.decode(tok_r, pos_r, P + t, alive_r).to(device) for name, m in models.items()}
        next_pos = next_pos + 1

    # trim the columns decoded after every row had finished (sync_every > 1)
    last = int(alive_hist.any(0).nonzero().max()) + 1 if bool(alive_hist.any()) else 1
    T_eff = min(t_used, last)

    def cut(x):
        return None if x is None else x[:, :T_eff]

    response = cut(tokens)
    response_mask = cut(alive_hist)
    ro = Rollout(
        input_ids=torch.cat([prompt_ids, response], 1),
        attention_mask=torch.cat([prompt_mask.long(), response_mask.long()], 1),
        response_mask=response_mask,
        prompt_len=P,
        teacher_logprobs=cut(t_full),
        token_logprobs_student=cut(s_tok_lp),
        finished=~alive,
        diagnostics={k: cut(v) for k, v in diags.items()},
        decode_s=time.perf_counter() - t0,
        rule_s=rule_s,
        topk_ids=cut(topk_ids),
        teacher_topk_logprobs=cut(t_topk),
        teacher_token_logprobs=cut(t_tok),
        teacher_entropy=cut(t_ent),
    )
    return ro
