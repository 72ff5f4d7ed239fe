"""One KV-cached, two-model decode loop that every method samples with.

``sample`` decodes a batch of left-padded prompts token by token. At each step the student (and,
when the behaviour rule needs it, the teacher) advances by ONE token using its KV cache; a
*behaviour rule* turns the two next-token distributions into the distribution the token is drawn
from. The rules are small objects:

    StudentRule(temperature)   pure student sampling (OPD, evaluation, temperature warmup)
    TeacherRule(temperature)   pure teacher sampling (offline KD data, SFT warmup data)
    TrustRegionRule(eps, ...)  TRB: mu_b ∝ pi_S^(1-b) pi_T^b with KL(mu_b||pi_S) <= eps
    SKDRule(top_k, ...)        SKD: student proposals outside the teacher's top-K are replaced
    GreedyRule()               argmax of the student (greedy evaluation)

The loop returns a ``Rollout``: token ids and masks for the training forward, the teacher's
log-probabilities at every response position when the teacher ran during decoding (so the loss
reuses them instead of a second teacher pass), and per-token diagnostics of the rule.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trb_exp.blending import merge_eos
# the behaviour rules' samplers live in trb_exp/rules/ (one module per rule); re-exported here
from trb_exp.rules.greedy import GreedyRule
from trb_exp.rules.skd import SKDRule
from trb_exp.rules.student import StudentRule
from trb_exp.rules.teacher import TeacherRule
from trb_exp.rules.trust_region import TrustRegionRule

ENGINES = ("eager", "static", "vllm")
TEACHER_STATS = ("full", "topk")
__all__ = ["ENGINES", "TEACHER_STATS", "GreedyRule", "Rollout", "SKDRule", "StudentRule", "TeacherRule",
           "TrustRegionRule", "concat_rollouts", "positions_from_mask", "response_logits", "sample", "sample_kwargs",
           "teacher_logprobs", "teacher_logprobs_at"]


# --------------------------------------------------------------------------- the rollout record
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


def _forward(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool = False, **kw):
    """The one place a model is called: inputs go to the model's device (a teacher may live on a
    second GPU) and the logits come back to the inputs' device, cut to the pair's shared vocabulary
    ``model.trb_vocab_size`` when the two embedding matrices are padded differently (``models.set_vocab_size``)."""
    home = input_ids.device
    dev = getattr(model, "device", home)
    if dev != home:
        input_ids, attention_mask, position_ids = (x.to(dev) for x in (input_ids, attention_mask, position_ids))
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
    logits = out.logits[:, -1] if last_only else out.logits
    vocab = getattr(getattr(model, "module", model), "trb_vocab_size", None)  # seen through a DDP wrapper
    if vocab is not None:
        logits = logits[..., :vocab]
    return logits.to(home), out


@functools.cache
def _cache_field() -> str:
    """The name transformers gives the KV cache, as a forward argument and an output field: ``cache`` from 5.2x
    on, ``past_key_values`` in 5.19 (which would silently ignore ``cache=``)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _step(model, ids, attention_mask, positions, cache):
    name = _cache_field()
    logits, out = _forward(model, ids, attention_mask, positions, last_only=True, use_cache=True, **{name: cache})
    return logits, getattr(out, name)


# --------------------------------------------------------------------------- the decode loop
@torch.no_grad()
def sample(
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
    engine: str = "eager",
    teacher_stats: str = "full",
    topk: int = 16,
    **static_kw,
) -> Rollout:
    """Decode ``max_new_tokens`` at most from left-padded prompts [B, P] under ``rule``.

    ``eos_ids``: every id that ends a sequence for either model (e.g. a Base student's
    ``<|endoftext|>`` and an instruct teacher's ``<|im_end|>``). When it holds ids other than
    ``eos_id``, both models' next-token logits are canonicalised with ``blending.merge_eos`` before the
    rule sees them: the EOS probabilities are summed into one event at ``eos_id`` (the student's),
    so every rule (the TRB solver and its KL budget included) works on the merged distributions, the
    sampled event is emitted as ``eos_id``, and the stored teacher log-probs are merged too. With no
    other id this costs nothing.

    ``engine``: ``eager`` (this loop: one Hugging Face forward per model and token) or ``static``
    (``engine.sample_static``: preallocated KV caches, fixed-shape steps, no per-token host sync; its
    extra knobs ``sync_every``, ``compile``, ``compact``, ``solver_iters`` pass through ``static_kw``).
    ``teacher_stats``: ``full`` keeps the teacher's [B, T, V] log-probs when it ran; ``topk`` keeps only
    the student's top-``topk`` ids and the teacher's log-probs there, at the sampled token and its entropy
    (O(B*T*k), ``Rollout`` docstring).
    """
    if engine not in ENGINES:
        raise ValueError(f"rollout.engine={engine!r}: use eager, static or vllm")
    if teacher_stats not in TEACHER_STATS:
        raise ValueError(f"rollout.teacher_stats={teacher_stats!r}: use full or topk")
    if engine == "vllm":  # static_kw["backend"]: the run's decode.vllm.VLLMRollouts (experiment.setup builds it)
        return static_kw["backend"].sample(prompt_ids, prompt_mask, rule, max_new_tokens=max_new_tokens,
                                           eos_id=eos_id, pad_id=pad_id, generator=generator,
                                           keep_teacher_logprobs=keep_teacher_logprobs, eos_ids=eos_ids,
                                           teacher_stats=teacher_stats, topk=topk)
    if engine == "static":
        from trb_exp.decode.engine import sample_static

        return sample_static(student, teacher, prompt_ids, prompt_mask, rule, max_new_tokens=max_new_tokens,
                             eos_id=eos_id, pad_id=pad_id, generator=generator,
                             keep_teacher_logprobs=keep_teacher_logprobs, eos_ids=eos_ids,
                             teacher_stats=teacher_stats, topk=topk, **static_kw)
    if static_kw:
        raise TypeError(f"sample(engine='eager') got static-engine arguments {sorted(static_kw)}")
    return _sample_eager(student, teacher, prompt_ids, prompt_mask, rule, max_new_tokens=max_new_tokens,
                         eos_id=eos_id, pad_id=pad_id, generator=generator, eos_ids=eos_ids,
                         record=_Record(keep_teacher_logprobs, teacher_stats, topk, rule.needs_student))


class _Record:
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
            from trb_exp.decode.engine import topk_stats

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


def _sample_eager(student, teacher, prompt_ids, prompt_mask, rule, *, max_new_tokens, eos_id, pad_id, generator,
                  eos_ids, record: _Record) -> Rollout:
    """The eager loop: one Hugging Face forward per model and decoded token, the attention mask grown by one
    column per token, a host check of "all rows finished?" after each."""
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
        logits[name], caches[name] = _step(m, prompt_ids, mask, pos, None)
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
            logits[name], caches[name] = _step(m, tok[:, None], mask, next_pos, caches[name])
        next_pos = next_pos + 1
    return record.rollout(prompt_ids, prompt_mask, ~alive, time.perf_counter() - t0, rule_s)


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


def response_logits(model, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """One batched forward over prompt+response; logits [B, T, V] predicting each response token."""
    logits, _ = _forward(model, input_ids, attention_mask, positions_from_mask(attention_mask), use_cache=False)
    return logits[:, prompt_len - 1 : -1]


@torch.no_grad()
def teacher_logprobs(teacher, rollout: Rollout, rows: slice = slice(None)) -> Tensor:
    """The teacher's log-probs over the response positions in one batched pass [B, T, V] (of the
    rollout's ``rows``)."""
    logits = response_logits(teacher, rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_len)
    return torch.log_softmax(logits.float(), -1)


def sample_kwargs(cfg, topk: int = 16) -> dict:
    """The ``rollout`` config group as keyword arguments of :func:`sample` (engine, its knobs, teacher_stats)."""
    rc = cfg.get("rollout") or {}
    kw = {"engine": str(rc.get("engine", "eager")), "teacher_stats": str(rc.get("teacher_stats", "full")),
          "topk": int(topk)}
    if kw["engine"] in ("static", "auto"):  # auto: vllm on a GPU with vllm installed, else static where it runs
                                            # (experiment.pick_engine)
        kw.update(sync_every=rc.get("sync_every"), compile=bool(rc.get("compile", False)),
                  compact=bool(rc.get("compact", True)), solver_iters=rc.get("solver_iters"))
    return kw


def eager_kwargs(rollout_kw: dict) -> dict:
    """``rollout_kw`` for the eager loop: the engine-independent keys (teacher statistics), without the static
    engine's knobs."""
    return {k: v for k, v in rollout_kw.items() if k in ("teacher_stats", "topk")} | {"engine": "eager"}


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
