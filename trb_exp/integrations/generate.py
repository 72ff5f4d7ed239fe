"""TRB inside Hugging Face ``generate``, without TRL: ``TRBConfig`` (the budget schedule),
``TRBLogitsProcessor`` (blends each next-token distribution with the teacher's under the KL budget),
``blended_generate`` (a context manager that makes ``student.generate`` sample from the blend) and the
refusals: ``generate`` options that would act on the blended distribution, and set-ups that would hang,
raise one ``TRBConfigError`` naming them. ``trb_exp.integrations.trl`` builds its trainers on these.

    with blended_generate(student, teacher, eps=0.05):
        out = student.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
)

from trb_exp.blending import merge_eos
from trb_exp.decode.forward import decode_step
from trb_exp.decode.record import positions_from_mask
from trb_exp.rules import TrustRegionSampler
from trb_exp.schedules import ADAPTIVE, SCHEDULES, budget_at, check_eps0


class TRBConfigError(ValueError):
    """A setting that would silently break the blend (or hang): one message naming it and the fix."""


def _is_real(v) -> bool:
    """An int or float, not a bool (``True`` would pass as 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------- the budget schedule
@dataclass(frozen=True)
class TRBConfig:
    """TRB's budget: ``eps_k = budget_at(k, schedule, eps0, warmup_steps, final_ratio)`` at training step k
    (``trb_exp.schedules``: linear, cosine, exponential, step, constant, none). ``budget="absolute"``: eps_k
    nats per token; ``"relative"``: eps = eps_k * KL(pi_T || pi_S) at each prefix (eps0 in [0, 1]).
    ``tol``: the solver's tolerance on beta."""

    eps0: float
    warmup_steps: int
    schedule: str = "linear"
    budget: str = "absolute"
    final_ratio: float = 0.01
    tol: float = 1e-6

    def __post_init__(self):
        if self.schedule in ADAPTIVE:
            raise TRBConfigError(f"TRBConfig.schedule={self.schedule!r}: adaptive schedules need per-step "
                                 "observations TRL does not provide; use one of "
                                 f"{', '.join(s for s in SCHEDULES if s not in ADAPTIVE)}")
        if self.schedule not in SCHEDULES:
            raise TRBConfigError(f"TRBConfig.schedule={self.schedule!r}: choose one of "
                                 f"{', '.join(s for s in SCHEDULES if s not in ADAPTIVE)}")
        check_eps0(self.eps0, relative=self.budget == "relative", finite=True, field="TRBConfig.eps0",
                   error=TRBConfigError)
        if not (isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool)
                and self.warmup_steps >= 0):
            raise TRBConfigError(f"TRBConfig.warmup_steps={self.warmup_steps!r}: the horizon K must be an "
                                 "integer >= 0")
        for name in ("final_ratio", "tol"):
            if not _is_real(getattr(self, name)):
                raise TRBConfigError(f"TRBConfig.{name}={getattr(self, name)!r}: must be a number")
        if self.budget not in ("absolute", "relative"):
            raise TRBConfigError(f"TRBConfig.budget={self.budget!r}: use 'absolute' (nats per token) or "
                                 "'relative' (a fraction of KL(pi_T||pi_S))")
        if not 0 < self.final_ratio <= 1:
            raise TRBConfigError(f"TRBConfig.final_ratio={self.final_ratio}: must be in (0, 1]")
        if not self.tol > 0:
            raise TRBConfigError(f"TRBConfig.tol={self.tol}: must be > 0")

    def eps_at(self, step: int) -> float:
        """The budget of training step ``step`` (0-based, ``trainer.state.global_step`` while its rollouts are
        generated)."""
        return float(budget_at(int(step), self.schedule, float(self.eps0), self.warmup_steps, self.final_ratio))


# --------------------------------------------------------------------------- the logits processor
def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, Tensor):
        eos = eos.flatten().tolist()
    if isinstance(eos, int):
        eos = [eos]
    return [int(i) for i in dict.fromkeys(eos)]


class TRBLogitsProcessor(LogitsProcessor):
    """A transformers ``LogitsProcessor`` that turns the student's next-token scores into ``log mu_beta``.

    Built for ONE ``generate`` call on left-padded prompts: ``prompt_attention_mask`` [B, P] is the mask given
    to ``generate``. On its first call (``input_ids`` = the prompts) it runs the teacher over the prompts; on
    every later call it advances the teacher by the one token ``generate`` appended, with its own KV cache, the
    attention mask and the position ids of ``decode.backend.sample`` (a row that has emitted an EOS stops being
    attended). It then applies ``TrustRegionSampler(eps, budget, temperature, tol)`` to the (student scores,
    teacher logits) pair, after merging the EOS ids into one event at ``eos_token_id[0]`` when there are several
    (``blending.merge_eos``, as ``decode.backend.sample``), and returns ``log mu`` times ``temperature`` (the
    temperature warper that ``generate`` applies after custom processors divides it back).

    Per decoded token it records ``beta``, ``kl`` (realised KL(mu || pi_S)), ``eps`` and ``alive`` (the token
    belongs to the completion: the row had not ended before it; its EOS counts): ``stats()`` sums them over
    the completion tokens. ``keep_teacher_logits=True`` also keeps the teacher's logits at every step.
    """

    def __init__(self, teacher, prompt_attention_mask: Tensor, eps: float, *, budget: str = "absolute",
                 temperature: float = 1.0, tol: float = 1e-6, eos_token_id=None, keep_teacher_logits: bool = False):
        if not (temperature and temperature > 0):
            raise TRBConfigError(f"temperature={temperature!r}: TRB samples, the temperature must be > 0")
        self.teacher = teacher
        self.prompt_mask = prompt_attention_mask.long()
        self.rule = TrustRegionSampler(eps=float(eps), budget=budget, temperature=float(temperature), tol=tol)
        self.temperature = float(temperature)
        self.eos_ids = _eos_list(eos_token_id)
        self.keep_teacher_logits = keep_teacher_logits
        self._cache = None
        self._len = None
        self._mask = self._alive = self._next_pos = None
        self.beta: list[Tensor] = []
        self.kl: list[Tensor] = []
        self.eps: list[Tensor] = []
        self.alive: list[Tensor] = []
        self.teacher_logits: list[Tensor] = []
        self.rule_s = 0.0  # wall time inside the TRB rule (the solver), summed over calls
        self.teacher_s = 0.0  # ... and in the teacher's cached forwards

    @torch.no_grad()
    def _teacher_next(self, input_ids: Tensor) -> Tensor:
        if self._cache is None:
            if input_ids.shape != self.prompt_mask.shape:
                raise TRBConfigError(
                    f"TRBLogitsProcessor: generate started from input_ids {tuple(input_ids.shape)} but the prompt "
                    f"attention mask is {tuple(self.prompt_mask.shape)}; build one processor per generate call, "
                    "with num_return_sequences=1")
            self._mask = self.prompt_mask.to(input_ids.device)
            pos = positions_from_mask(self._mask)
            logits, self._cache = decode_step(self.teacher, input_ids, self._mask, pos, None)
            self._next_pos = pos[:, -1:] + 1
            self._alive = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        else:
            if input_ids.shape[1] != self._len + 1:
                raise TRBConfigError(
                    f"TRBLogitsProcessor: expected one new token per call (length {self._len + 1}), got length "
                    f"{input_ids.shape[1]}; TRB supports plain sampling only (no assisted or beam decoding), and "
                    "a processor serves one generate call")
            tok = input_ids[:, -1]
            self._mask = torch.cat([self._mask, self._alive.long()[:, None]], 1)
            if self.eos_ids:
                self._alive = self._alive & ~torch.isin(tok, torch.tensor(self.eos_ids, device=tok.device))
            logits, self._cache = decode_step(self.teacher, tok[:, None], self._mask, self._next_pos, self._cache)
            self._next_pos = self._next_pos + 1
        self._len = input_ids.shape[1]
        return logits

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        t_teacher = time.perf_counter()
        teacher_logits = self._teacher_next(input_ids)
        self.teacher_s += time.perf_counter() - t_teacher
        if teacher_logits.shape[-1] != scores.shape[-1]:
            raise TRBConfigError(
                f"TRB: the student's scores have {scores.shape[-1]} entries but the teacher's logits "
                f"{teacher_logits.shape[-1]}; student and teacher must share one vocabulary (same tokenizer, same "
                "embedding rows)")
        s, t = scores, teacher_logits
        if len(self.eos_ids) > 1:  # one shared end-of-sequence event at eos_ids[0], as decode.backend.sample
            s = merge_eos(s, self.eos_ids, self.eos_ids[0])
            t = merge_eos(t, self.eos_ids, self.eos_ids[0])
        t0 = time.perf_counter()
        logp, diag = self.rule(s, t)
        self.rule_s += time.perf_counter() - t0
        logp = torch.nan_to_num(logp, nan=float("-inf"))
        self.beta.append(diag["beta"])
        self.kl.append(diag["kl_behavior_student"])
        self.eps.append(diag["eps"].to(logp.device))
        self.alive.append(self._alive.clone())
        if self.keep_teacher_logits:
            self.teacher_logits.append(teacher_logits.float())
        out = logp if self.temperature == 1.0 else logp * self.temperature
        return out.to(scores.dtype)

    def stats(self) -> dict[str, float]:
        """Sums over the completion tokens: ``tokens``, ``beta_sum``, ``kl_sum``, ``kl_max`` (0 if none)."""
        if not self.alive:
            return {"tokens": 0.0, "beta_sum": 0.0, "kl_sum": 0.0, "kl_max": 0.0}
        alive = torch.stack(self.alive, 1)
        beta, kl = torch.stack(self.beta, 1).float(), torch.stack(self.kl, 1).float()
        n = int(alive.sum())
        return {"tokens": float(n), "beta_sum": float(beta[alive].sum()), "kl_sum": float(kl[alive].sum()),
                "kl_max": float(kl[alive].max()) if n else 0.0}

    def per_token(self, name: str) -> Tensor:
        """[B, T] of ``beta``, ``kl``, ``eps`` or ``alive`` over the decoded positions."""
        return torch.stack(getattr(self, name), 1)


# --------------------------------------------------------------------------- refusals
_FORBIDDEN = (  # (field, "is active" predicate): options that change the distribution after (or before) blending
    ("top_k", lambda v: v is not None and v != 0),
    ("top_p", lambda v: v is not None and v < 1.0),
    ("min_p", lambda v: v is not None),  # transformers adds its warper for any value, 0 included
    ("typical_p", lambda v: v is not None and v < 1.0),
    ("epsilon_cutoff", lambda v: v is not None and 0.0 < v < 1.0),
    ("eta_cutoff", lambda v: v is not None and 0.0 < v < 1.0),
    ("top_h", lambda v: v is not None),
    ("repetition_penalty", lambda v: v is not None and v != 1.0),
    ("encoder_repetition_penalty", lambda v: v is not None and v != 1.0),
    ("no_repeat_ngram_size", lambda v: v is not None and v > 0),
    ("sequence_bias", lambda v: v is not None),
    ("bad_words_ids", lambda v: v is not None),
    ("min_new_tokens", lambda v: v is not None and v > 0),
    ("forced_bos_token_id", lambda v: v is not None),
    ("forced_eos_token_id", lambda v: v is not None),
    ("exponential_decay_length_penalty", lambda v: v is not None),
    ("guidance_scale", lambda v: v is not None and v != 1),
    ("watermarking_config", lambda v: v is not None),
    ("num_beams", lambda v: v is not None and v > 1),
    ("num_return_sequences", lambda v: v is not None and v > 1),
    ("do_sample", lambda v: v is False),
)


def check_generation_config(gen) -> list[str]:
    """The settings of a ``GenerationConfig`` (or dict) that TRB cannot honour, as ``"name=value"`` strings."""
    get = gen.get if isinstance(gen, dict) else (lambda k, d=None: getattr(gen, k, d))
    return [f"{name}={get(name)!r}" for name, active in _FORBIDDEN if active(get(name))]


_ALLOWED_PROCESSORS = (TemperatureLogitsWarper, SuppressTokensLogitsProcessor, SuppressTokensAtBeginLogitsProcessor)


def check_processor_list(processors) -> None:
    """Refuse a ``generate`` processor list with anything that would act on the blend besides the temperature
    warper (and token suppression, which only masks tokens of the student before blending); check that the
    temperature ``generate`` applies after the blend is the one it was computed at."""
    bad = [type(p).__name__ for p in processors
           if not isinstance(p, (TRBLogitsProcessor, *_ALLOWED_PROCESSORS))]
    if bad:
        raise TRBConfigError(
            f"TRB: generate would apply {', '.join(bad)} to the blended distribution, so the rollouts would not "
            "follow mu_beta (nor respect the KL budget); turn these generation options off (top_k=0, top_p=1.0, "
            "min_p=None, repetition_penalty=1.0, in the config and in the model's generation_config)")
    ours = [i for i, p in enumerate(processors) if isinstance(p, TRBLogitsProcessor)]
    if len(ours) > 1:
        raise TRBConfigError("TRB: generate got more than one TRBLogitsProcessor")
    if ours:
        warpers = [(i, p.temperature) for i, p in enumerate(processors) if isinstance(p, TemperatureLogitsWarper)]
        applied = math.prod(t for _, t in warpers)
        proc = processors[ours[0]]
        if any(i < ours[0] for i, _ in warpers) or not math.isclose(applied, proc.temperature, rel_tol=1e-12):
            raise TRBConfigError(
                f"TRB: the blend was computed at temperature {proc.temperature} but generate applies temperature "
                f"{applied} after it; pass the sampling temperature in the generation_config given to generate")


def refusals(*, generation=None, use_vllm: bool = False, eps_first: float = 0.0, sharded_teacher: bool = False,
             num_processes: int = 1, student_vocab: int | None = None, teacher_vocab: int | None = None,
             multimodal: bool = False, token_ids: tuple[dict, dict] | None = None, temperature=None) -> None:
    """Raise ONE ``TRBConfigError`` naming every setting that would silently break the blend (or hang).

    ``eps_first``: the budget of the first training step (schedules never increase, so 0 means no blending);
    ``token_ids``: the student's and the teacher's tokenizer vocabularies (token -> id), when known;
    ``temperature``: the sampling temperature of the training rollouts, when known."""
    problems = []
    if temperature is not None and not (_is_real(temperature) and math.isfinite(temperature) and temperature > 0):
        problems.append(f"temperature={temperature!r}: the blend samples from mu_b at a temperature T > 0 "
                        "(T = 0 is greedy decoding, which has no distribution to blend); use e.g. temperature=1.0")
    if token_ids is not None and token_ids[0] != token_ids[1]:
        s, t = token_ids
        diff = sorted(set(s.items()) ^ set(t.items()))[:3]
        problems.append(f"tokenizers that map tokens to different ids (e.g. {diff}): the blend compares the two "
                        "next-token distributions id by id; pick a teacher from the student's model family")
    if generation is not None:
        bad = check_generation_config(generation)
        if bad:
            problems.append(f"generation options that change the distribution after blending ({', '.join(bad)}): "
                            "set top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0 and drop the others")
    if use_vllm and eps_first > 0:
        problems.append("use_vllm=True during the warmup: vLLM has no per-token hook for the blend; set "
                        "use_vllm=False (or start TRB with eps0=0)")
    if sharded_teacher and num_processes > 1 and eps_first > 0:
        problems.append(f"a sharded (DeepSpeed ZeRO-3 / FSDP) teacher on {num_processes} processes: generate runs "
                        "with synced_gpus and skips logits processors on finished ranks, so the collective teacher "
                        "forward would hang; keep the teacher unsharded (ZeRO-0/1/2 or a replicated copy)")
    if multimodal and eps_first > 0:
        problems.append("a vision-language processing class: the teacher in the decode loop is given token ids "
                        "only (no pixel values); TRB in TRL supports text-only models")
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        problems.append(f"different vocabularies (student {student_vocab}, teacher {teacher_vocab} output rows): "
                        "the blend compares the two next-token distributions token by token")
    if problems:
        raise TRBConfigError("TRB cannot blend with " + "; ".join(problems))


# --------------------------------------------------------------------------- the generate wrapper
@contextlib.contextmanager
def blended_generate(student, teacher, eps: float, *, budget: str = "absolute", tol: float = 1e-6,
                     on_done: Callable[[TRBLogitsProcessor], None] | None = None):
    """Within the block, ``student.generate(input_ids=..., attention_mask=..., generation_config=...)`` samples
    from TRB's blend with budget ``eps``: each call gets a fresh ``TRBLogitsProcessor`` (temperature and EOS
    ids from the generation config), and ``on_done(processor)`` sees it afterwards. The student's own
    ``generate`` (and ``_get_logits_processor``, wrapped to check the processor list) are restored on exit."""
    base = student.get_base_model() if hasattr(student, "get_base_model") else student  # PEFT: the real generate
    saved = {(id(obj), name): (obj, name, vars(obj).get(name, _MISSING))
             for obj, name in ((student, "generate"), (base, "_get_logits_processor"))}
    original_generate = student.generate
    original_glp = base._get_logits_processor

    def checked_glp(*args, **kwargs):
        procs = original_glp(*args, **kwargs)
        check_processor_list(procs)
        return procs

    def generate(*args, **kwargs):
        if args:
            raise TRBConfigError("TRB: call generate with keyword arguments (input_ids=..., attention_mask=...)")
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise TRBConfigError("TRB: generate needs input_ids (left-padded prompts)")
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        gen = kwargs.get("generation_config") or student.generation_config
        bad = check_generation_config(gen)
        if bad:
            refusals(generation=gen)
        proc = TRBLogitsProcessor(teacher, mask, eps, budget=budget, temperature=gen.temperature or 1.0, tol=tol,
                                  eos_token_id=gen.eos_token_id)
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), proc])
        out = original_generate(**kwargs)
        if on_done is not None:
            on_done(proc)
        return out

    student.generate = generate
    base._get_logits_processor = checked_glp
    try:
        yield
    finally:
        for obj, name, value in saved.values():
            if value is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
            else:
                setattr(obj, name, value)


_MISSING = object()
