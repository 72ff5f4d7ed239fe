"""``StaticLM``: the functional forward of the static decode engine (``rollout.engine=static``, see
``trb_exp.decode.static``) over a preallocated KV cache.

It runs a Hugging Face Llama / Qwen2 / Qwen3 / Mistral causal LM (full attention) with the model's own
weights: one KV cache ``[B, H_kv, P + max_new, D]`` per layer allocated once, K/V of the new token written
in place, a key-validity mask ``[B, P + max_new]`` updated in place, RoPE from a table built once. Prefill is
the same code on the prompt. The tiny models this project trains on CPU are dispatch-bound (a decode step is
~20 small ops per layer), so the step is cut to few ops: q/k/v are one matmul and gate/up another (the
weights concatenated into buffers refreshed from the live parameters at every ``reset``: the student
trains between rollouts), RoPE runs once over q and k together, K/V are written with a slice copy.
Concatenating output features does not change any dot product: the logits are those of the HF forward.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
# Matmuls over fewer rows than this round differently on a CPU (MKL's sgemm takes a small-matrix path: for M <= 3
# on AVX-512 without AMX, M <= 15 on Sapphire Rapids with AMX, the reference machine), so a row's logits would no
# longer be bit-identical to the eager loop's: never decode (or take logits of) fewer rows than this, unless the
# whole batch is smaller (then the eager loop has the same row count).
MIN_ROWS = 16


class UnsupportedModel(ValueError):
    pass


def check_supported(model) -> None:
    """Raise ``UnsupportedModel`` (a one-line message naming ``rollout.engine=eager``) for a model the
    static engine cannot run."""
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


def _rms(x: Tensor, norm: tuple) -> Tensor:
    """Exactly ``LlamaRMSNorm`` / ``Qwen3RMSNorm`` given ``(weight, eps)`` (float32: torch's fused kernel,
    bit-identical on CPU)."""
    weight, eps = norm
    dt = x.dtype
    if dt == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dt)


def _norm(module) -> tuple:
    """An RMSNorm module as ``(weight, eps)`` (the live parameter: read once, not per token)."""
    return module.weight, module.variance_epsilon


def _rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = cat(-x2, x1) = roll(x) * (-1, 1):
    the sign lives in ``sin_signed`` (exact in floating point)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _simple_mlp(m) -> bool:
    """gate/up/down without bias, SiLU: the MLP the fused gate|up matmul reproduces."""
    return (type(m).__name__.endswith("MLP") and hasattr(m, "gate_proj") and not getattr(m, "mlp_bias", False)
            and m.gate_proj.bias is None and m.up_proj.bias is None and m.down_proj.bias is None
            and m.act_fn.__class__.__name__ == "SiLUActivation")


class _Fused:
    """One layer's concatenated weights: ``qkv`` [(H_q + 2 H_kv) D, d] (+ bias), ``gu`` [2 I, d] (None when
    the MLP is not the plain SiLU-gated one), in buffers allocated once and refreshed by ``refresh``."""

    def __init__(self, layer):
        a, m = layer.self_attn, layer.mlp
        self.projs = (a.q_proj, a.k_proj, a.v_proj)
        self.qkv = torch.cat([p.weight.detach() for p in self.projs])
        has_b = [p.bias is not None for p in self.projs]
        self.qkv_b = torch.cat([p.bias.detach() if p.bias is not None else p.weight.new_zeros(p.weight.shape[0])
                                for p in self.projs]) if any(has_b) else None
        self.mlp = m if _simple_mlp(m) else None
        self.gu = torch.cat([m.gate_proj.weight.detach(), m.up_proj.weight.detach()]) if self.mlp is not None else None
        self.inter = m.gate_proj.weight.shape[0] if self.mlp is not None else 0
        self.o, self.o_b = a.o_proj.weight, a.o_proj.bias
        self.down = m.down_proj.weight if self.mlp is not None else None
        self.module_mlp = m
        self.in_norm, self.post_norm = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        self.qk_norm = (_norm(a.q_norm), _norm(a.k_norm)) if hasattr(a, "q_norm") else None  # Qwen3

    def refresh(self) -> None:
        with torch.no_grad():
            torch.cat([p.weight for p in self.projs], out=self.qkv)
            if self.qkv_b is not None:
                torch.cat([p.bias if p.bias is not None else torch.zeros_like(self.qkv_b[: p.weight.shape[0]])
                           for p in self.projs], out=self.qkv_b)
            if self.mlp is not None:
                torch.cat([self.mlp.gate_proj.weight, self.mlp.up_proj.weight], out=self.gu)

    def buffers(self):
        return [x for x in (self.qkv, self.qkv_b, self.gu) if x is not None]


class StaticLM:
    """A decoder-only LM with a preallocated KV cache for ``batch`` rows of ``max_len`` tokens."""

    def __init__(self, model, batch: int, max_len: int, *, compile: bool = False):
        check_supported(model)
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
        sin_signed = torch.cat([-sin[0, :, :d], sin[0, :, d:]], -1)
        self.cs = torch.stack([cos[0], sin_signed], 1)  # [max_len, 2, D]: cos and signed sin, model dtype
        emb = self.inner.embed_tokens
        self.embed_w = emb.weight if type(emb) is torch.nn.Embedding else None
        head = self.lm_head
        self.head_w = head.weight if type(head) is torch.nn.Linear and head.bias is None else None
        self.final_norm = _norm(self.inner.norm)
        self.w = [_Fused(layer) for layer in self.layers]
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
                for x in (*views[0], *views[1], views[2], self.cs, *(b for w in self.w for b in w.buffers())):
                    mark(x)
            self._views[n] = views
        self.k, self.v, self.key_valid = self._views[n]

    def reset(self) -> None:
        """Ready for a new batch: all rows, no valid key (stale K/V behind a False mask weigh exactly 0),
        the fused weights copied from the model's current parameters."""
        self._set_rows(self.batch)
        self.key_valid.zero_()
        for w in self.w:
            w.refresh()

    def _attend(self, q: Tensor, kc: Tensor, vc: Tensor, mask: Tensor) -> Tensor:
        """softmax(q k^T * scale + mask) v with torch's SDPA, as the HF models call it (a hand-written bmm
        version is ~1.5x faster on tiny CPU shapes but moves logits by ~1e-5: not the eager numbers)."""
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=self.scaling,
                                              enable_gqa=self.n_heads != self.n_kv)

    # ------------------------------------------------------------------ forward pieces
    def _qkv(self, w: _Fused, x: Tensor, cos: Tensor, sin: Tensor):
        """q [B, H, S, D] and k, v [B, H_kv, S, D] (q, k rotated) from one matmul and one RoPE."""
        B, S, _ = x.shape
        hq, hkv = self.n_heads, self.n_kv
        qkv = F.linear(x, w.qkv, w.qkv_b).view(B, S, hq + 2 * hkv, self.head_dim)
        if w.qk_norm is not None:  # Qwen3: per-head RMSNorm of q and k
            q = _rope(_rms(qkv[:, :, :hq], w.qk_norm[0]).transpose(1, 2), cos, sin)
            k = _rope(_rms(qkv[:, :, hq : hq + hkv], w.qk_norm[1]).transpose(1, 2), cos, sin)
        else:
            qk = _rope(qkv[:, :, : hq + hkv].transpose(1, 2), cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
        return q, k, qkv[:, :, hq + hkv :].transpose(1, 2)

    @staticmethod
    def _mlp(w: _Fused, x: Tensor) -> Tensor:
        if w.mlp is None:
            return w.module_mlp(x)
        gu = F.linear(x, w.gu)
        return F.linear(F.silu(gu[..., : w.inter]).mul_(gu[..., w.inter :]), w.down)

    def _layer(self, i: int, h: Tensor, cos: Tensor, sin: Tensor, write, mask: Tensor) -> Tensor:
        """One decoder layer; ``write(i, k, v)`` stores the new K/V and returns the K/V to attend to."""
        B, S, _ = h.shape
        w = self.w[i]
        q, k, v = self._qkv(w, _rms(h, w.in_norm), cos, sin)
        kc, vc = write(i, k, v)
        o = self._attend(q, kc, vc, mask)
        h = h + F.linear(o.transpose(1, 2).reshape(B, S, -1), w.o, w.o_b)
        return h + self._mlp(w, _rms(h, w.post_norm))

    def _embed(self, ids: Tensor) -> Tensor:
        return self.inner.embed_tokens(ids) if self.embed_w is None else F.embedding(ids, self.embed_w)

    def _logits(self, h: Tensor) -> Tensor:
        h = _rms(h, self.final_norm)
        logits = self.lm_head(h) if self.head_w is None else F.linear(h, self.head_w)
        if self.vocab is not None:
            logits = logits[..., : self.vocab]
        return logits

    @torch.no_grad()
    def prefill(self, ids: Tensor, prompt_mask: Tensor, pos: Tensor, rows: Tensor | None = None) -> Tensor:
        """The prompt [n, P] (left padded) into columns 0..P-1 of the cache; last-token logits [B, V].
        ``rows`` [B]: batch row b is prompt ``rows[b]`` (repeated prompts run once); None: n = B, the identity."""
        P = ids.shape[1]
        ids, prompt_mask, pos = ids.to(self.device), prompt_mask.to(self.device), pos.to(self.device)
        if rows is not None:
            rows = rows.to(self.device)
        valid = prompt_mask.bool()
        self.key_valid[:, :P] = valid if rows is None else valid.index_select(0, rows)
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()
        # every query also sees itself, so the (unused) rows of left padding stay finite
        mask = (causal & valid[:, None, None, :]) | torch.eye(P, dtype=torch.bool, device=self.device)
        cs = self.cs[pos]  # [n, P, 2, D]
        cos, sin = cs[:, None, :, 0], cs[:, None, :, 1]

        def write(i, k, v):  # attend to the prompt's own K/V (n rows), store them for the B rows
            self.k[i][:, :, :P] = k if rows is None else k.index_select(0, rows)
            self.v[i][:, :, :P] = v if rows is None else v.index_select(0, rows)
            return k, v

        h = self._embed(ids)
        for i in range(len(self.w)):
            h = self._layer(i, h, cos, sin, write, mask)
        # the eager loop takes the LM head over all B x P positions: at least MIN_ROWS rows here too
        logits = self._logits(h)[:, -1] if h.shape[0] < MIN_ROWS else self._logits(h[:, -1])
        return logits if rows is None else logits.index_select(0, rows)

    def _decode_impl(self, tok: Tensor, pos: Tensor, col: Tensor, alive: Tensor) -> Tensor:
        """The captured step: one token per row, ``tok`` [B] at positions ``pos`` [B] into cache column ``col``
        (a 1-element tensor: the same column for every row), attending over the whole (masked) cache; ``alive``
        [B] marks the column valid. Logits [B, V]."""
        self.key_valid.index_copy_(1, col, alive[:, None])
        mask = self.key_valid[:, None, None, :]

        def write(i, k, v):
            self.k[i].index_copy_(2, col, k)
            self.v[i].index_copy_(2, col, v)
            return self.k[i], self.v[i]

        cs = self.cs[pos][:, None]  # [B, 1, 2, D]
        cos, sin = cs[:, :, 0:1], cs[:, :, 1:2]
        h = self._embed(tok[:, None])
        for i in range(len(self.w)):
            h = self._layer(i, h, cos, sin, write, mask)
        return self._logits(h[:, -1])

    def _decode_rows(self, tok: Tensor, pos: Tensor, kv_len: int, alive: Tensor) -> Tensor:
        """The uncaptured step (CPU): the same arithmetic on [B, d] hidden states (no sequence dimension, so
        fewer view and reshape ops per token), attending over the ``kv_len`` filled columns; the new K/V go to
        column ``kv_len - 1`` with a slice copy. Logits [B, V]."""
        self.key_valid[:, kv_len - 1] = alive
        valid = self.key_valid[:, None, None, :kv_len]
        # the additive mask SDPA would build from the bool one in every layer, built once (same bits)
        mask = torch.zeros(valid.shape, dtype=self.dtype, device=self.device).masked_fill_(~valid, float("-inf"))
        cs = self.cs.index_select(0, pos)
        cos, sin = cs[:, None, 0:1], cs[:, None, 1:2]  # [B, 1, 1, D]
        B, hq, hkv = tok.shape[0], self.n_heads, self.n_kv
        h = self._embed(tok)
        for i, w in enumerate(self.w):
            qkv = F.linear(_rms(h, w.in_norm), w.qkv, w.qkv_b).view(B, hq + 2 * hkv, 1, self.head_dim)
            if w.qk_norm is not None:  # Qwen3: per-head RMSNorm of q and k
                q, k = (_rope(_rms(x, n), cos, sin) for x, n in ((qkv[:, :hq], w.qk_norm[0]),
                                                                 (qkv[:, hq : hq + hkv], w.qk_norm[1])))
            else:
                qk = _rope(qkv[:, : hq + hkv], cos, sin)
                q, k = qk[:, :hq], qk[:, hq:]
            kc, vc = self.k[i][:, :, :kv_len], self.v[i][:, :, :kv_len]
            kc[:, :, kv_len - 1 :] = k
            vc[:, :, kv_len - 1 :] = qkv[:, hq + hkv :]
            h = h + F.linear(self._attend(q, kc, vc, mask).reshape(B, -1), w.o, w.o_b)
            h = h + self._mlp(w, _rms(h, w.post_norm))
        return self._logits(h)

    @torch.no_grad()
    def decode(self, tok: Tensor, pos: Tensor, col: int, alive: Tensor) -> Tensor:
        tok, pos, alive = tok.to(self.device), pos.to(self.device), alive.to(self.device)
        if self.compiled:  # fixed shapes: attend over the whole (masked) cache
            col_t = torch.full((1,), col, dtype=torch.long, device=self.device)
            return self._decode(tok, pos, col_t, alive).clone()
        return self._decode_rows(tok, pos, col + 1, alive)

    def compact(self, rows: Tensor, upto: int | None = None) -> None:
        """Keep only ``rows`` (ascending indices into the current batch): they move to the front of every
        buffer, in place (a captured step gets one graph per row count: powers of two, see ``_bucket``).
        ``upto``: only the first ``upto`` cache columns hold anything yet (uncaptured: copy just those)."""
        rows = rows.to(self.device)
        n = rows.numel()
        f = 0  # uncaptured: the rows before the first dropped one are already in place (a host read, free on a CPU)
        if not self.compiled:
            moved = (rows != torch.arange(n, device=rows.device)).nonzero()
            f = int(moved[0, 0]) if moved.numel() else n
        for x in (*self.k, *self.v):
            if f < n:
                x[f:n, :, :upto] = x[:, :, :upto].index_select(0, rows[f:])
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
