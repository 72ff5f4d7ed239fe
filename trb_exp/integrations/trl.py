"""TRB rollouts inside TRL: a drop-in for ``trl.DistillationTrainer`` (and GKD), tested against TRL 1.16.

Change one class and keep your accelerate/DeepSpeed setup, dataset and loss::

    from trb_exp.integrations.trl import TRBConfig, TRBDistillationTrainer
    trainer = TRBDistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
                                     train_dataset=ds, processing_class=tok,
                                     trb=TRBConfig(eps0=0.5, warmup_steps=50))   # schedule="linear"

While the step's budget ``eps_k = budget_at(k, schedule, eps0, warmup_steps)`` is > 0, the student's rollouts
are drawn from the blend ``mu_b ∝ pi_S^(1-b) pi_T^b`` with the largest ``b`` such that
``KL(mu_b || pi_S) <= eps_k`` at every decoded token (``trb_exp.blending.trust_region_blend``, through
``trb_exp.rollout.TrustRegionRule``: the project's own solver and rule). Evaluation and the steps after the
warmup take TRL's own path unchanged. TRL's loss is untouched: TRB only changes which prefixes are visited.

How: TRL offers no way to hand ``generate`` a ``logits_processor``. ``TRBDistillationTrainer`` overrides the
private ``DistillationTrainer._generate`` (once per generation batch: the step's budget, then the metrics) and
``_generate_single_turn`` (hence the pin to the tested TRL range): for the duration of the latter the unwrapped
student's ``generate`` is replaced by a wrapper that adds a ``TRBLogitsProcessor``, and it is restored
afterwards (also on errors). The processor advances the teacher by one token per call with
its own KV cache (prompt attention mask and positions as ``rollout.sample``), blends, and returns ``log mu``
(times T when T != 1, because transformers' temperature warper runs after custom processors), so the token
transformers samples is drawn from ``mu``. Same seed, same tokens and betas as
``rollout.sample(..., TrustRegionRule(eps))``.

Refused with one ``TRBConfigError`` message (they would silently change the distribution after blending, or
hang): top-k/top-p/min-p/typical/epsilon/eta sampling, repetition and n-gram penalties and other
distribution-changing ``generate`` options; ``use_vllm=True`` while the budget is > 0 (vLLM has no per-token
hook); a sharded (DeepSpeed ZeRO-3 / FSDP) teacher with several processes (``generate(synced_gpus=True)`` skips
the processors on finished ranks, so a collective teacher forward would hang); student and teacher with
different vocabularies; adaptive schedules (``gap``, ``reward``: they need observations TRL does not provide).

Each training step logs ``trb/eps``, ``trb/beta_mean``, ``trb/kl_mean`` and ``trb/kl_max`` (means and max over
the completion tokens, EOS included, across processes) through TRL's metrics, so they land in
``trainer.state.log_history``, W&B and TensorBoard with TRL's own. After the warmup they are 0.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
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
from trb_exp.rollout import TrustRegionRule, _step, positions_from_mask
from trb_exp.schedules import ADAPTIVE, SCHEDULES, budget_at

__all__ = [
    "TESTED_TRL",
    "TRBConfig",
    "TRBConfigError",
    "TRBLogitsProcessor",
    "TRBDistillationTrainer",
    "TRBGKDTrainer",  # noqa: F822 - defined on first access (module __getattr__)
    "blended_generate",
    "check_generation_config",
    "refusals",
]

TESTED_TRL = (">=1.16", "<1.17")  # the private override points were read and tested on TRL 1.16.0


class TRBConfigError(ValueError):
    """A setting that would silently break the blend (or hang): one message naming it and the fix."""


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
        if not (isinstance(self.eps0, (int, float)) and math.isfinite(self.eps0) and self.eps0 >= 0):
            raise TRBConfigError(f"TRBConfig.eps0={self.eps0!r}: a KL budget must be a finite number >= 0 "
                                 "(0 = plain on-policy distillation)")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise TRBConfigError(f"TRBConfig.warmup_steps={self.warmup_steps!r}: the horizon K must be an "
                                 "integer >= 0")
        if self.budget not in ("absolute", "relative"):
            raise TRBConfigError(f"TRBConfig.budget={self.budget!r}: use 'absolute' (nats per token) or "
                                 "'relative' (a fraction of KL(pi_T||pi_S))")
        if self.budget == "relative" and self.eps0 > 1:
            raise TRBConfigError(f"TRBConfig.eps0={self.eps0}: a relative budget is a fraction in [0, 1]")
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
    attention mask and the position ids of ``rollout.sample`` (a row that has emitted an EOS stops being
    attended). It then applies ``TrustRegionRule(eps, budget, temperature, tol)`` to the (student scores,
    teacher logits) pair, after merging the EOS ids into one event at ``eos_token_id[0]`` when there are several
    (``blending.merge_eos``, as ``rollout.sample``), and returns ``log mu`` times ``temperature`` (the
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
        self.rule = TrustRegionRule(eps=float(eps), budget=budget, temperature=float(temperature), tol=tol)
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
            logits, self._cache = _step(self.teacher, input_ids, self._mask, pos, None)
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
            logits, self._cache = _step(self.teacher, tok[:, None], self._mask, self._next_pos, self._cache)
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
        if len(self.eos_ids) > 1:  # one shared end-of-sequence event at eos_ids[0], as rollout.sample
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
             multimodal: bool = False) -> None:
    """Raise ONE ``TRBConfigError`` naming every setting that would silently break the blend (or hang).

    ``eps_first``: the budget of the first training step (schedules never increase, so 0 means no blending)."""
    problems = []
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


def _output_rows(model) -> int | None:
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except Exception:  # noqa: BLE001 - a model without output embeddings: fall back to the config
        cfg = getattr(model, "config", None)
        return getattr(cfg.get_text_config(), "vocab_size", None) if cfg is not None else None


def _check_trl_version() -> None:
    import trl
    from packaging.version import Version

    v = Version(trl.__version__)
    if not (Version(TESTED_TRL[0][2:]) <= v < Version(TESTED_TRL[1][1:])):
        warnings.warn(f"trb_exp.integrations.trl was tested with trl{','.join(TESTED_TRL)} and overrides private "
                      f"TRL methods; found trl {trl.__version__}", stacklevel=3)


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


# --------------------------------------------------------------------------- shared trainer logic
class _TRBMixin:
    """What both trainers share: the budget, the refusals, the per-step statistics and their logging."""

    trb: TRBConfig

    def _trb_setup(self, trb: TRBConfig) -> None:
        if not isinstance(trb, TRBConfig):
            raise TRBConfigError(f"trb={trb!r}: pass trb=TRBConfig(eps0=..., warmup_steps=...)")
        self.trb = trb
        self._trb_eps = 0.0  # the budget of the generation in progress (0: TRL's own path)
        self._trb_stats: list[dict[str, float]] = []

    def _trb_teacher(self):
        return self.accelerator.unwrap_model(self.teacher_model)

    def _trb_refuse(self, generation) -> None:
        backend = getattr(self, "_dist", None)
        is_zero3 = bool(getattr(backend, "is_zero3", False)) if backend is not None else (
            getattr(self, "is_deepspeed_enabled", False)
            and getattr(getattr(self.accelerator.state, "deepspeed_plugin", None), "zero_stage", 0) == 3)
        sharded = is_zero3 or bool(getattr(self, "is_fsdp_enabled", False))
        refusals(generation=generation, use_vllm=bool(getattr(self.args, "use_vllm", False)),
                 eps_first=self.trb.eps_at(0), sharded_teacher=sharded, num_processes=self.accelerator.num_processes,
                 student_vocab=_output_rows(self.accelerator.unwrap_model(self.model)),
                 teacher_vocab=_output_rows(self._trb_teacher()), multimodal=bool(getattr(self, "_is_vlm", False)))

    def _trb_early(self, args, kwargs, names=("model", "teacher_model", "args")) -> None:
        """The refusals that can be decided before TRL's own __init__ (which imports vLLM when use_vllm=True and
        words the vocabulary check its own way)."""
        got = dict(zip(names, args))
        got.update({k: kwargs[k] for k in names if k in kwargs})
        student, teacher, targs = got.get("model"), got.get("teacher_model"), got.get("args")
        loaded = [m if hasattr(m, "get_output_embeddings") else None for m in (student, teacher)]
        refusals(use_vllm=bool(getattr(targs, "use_vllm", False)), eps_first=self.trb.eps_at(0),
                 student_vocab=_output_rows(loaded[0]) if all(loaded) else None,
                 teacher_vocab=_output_rows(loaded[1]) if all(loaded) else None)

    def _trb_collect(self, proc: TRBLogitsProcessor) -> None:
        self._trb_stats.append(proc.stats())

    def _trb_log(self, eps: float, gather: bool = True) -> None:
        """Append the step's trb/* metrics to TRL's metrics buffer: gathered over processes (a collective: call
        it on every process), or this process's own with ``gather=False``."""
        stats, self._trb_stats = self._trb_stats, []
        local = torch.tensor([sum(s["tokens"] for s in stats), sum(s["beta_sum"] for s in stats),
                              sum(s["kl_sum"] for s in stats), max([s["kl_max"] for s in stats], default=0.0)],
                             dtype=torch.float64, device=self.accelerator.device)
        allv = self.accelerator.gather(local[None]).reshape(-1, 4) if gather else local[None]
        n = float(allv[:, 0].sum())
        m = self._metrics["train"]
        m["trb/eps"].append(float(eps))
        m["trb/beta_mean"].append(float(allv[:, 1].sum()) / n if n else 0.0)
        m["trb/kl_mean"].append(float(allv[:, 2].sum()) / n if n else 0.0)
        m["trb/kl_max"].append(float(allv[:, 3].max()))


# --------------------------------------------------------------------------- DistillationTrainer
from trl import DistillationTrainer  # the integration needs TRL: pip install -e ".[trl]"


class TRBDistillationTrainer(_TRBMixin, DistillationTrainer):
    """``trl.DistillationTrainer`` whose training rollouts come from TRB's blend while ``eps_k > 0``.

    Takes every argument of ``DistillationTrainer`` plus ``trb=TRBConfig(eps0, warmup_steps, schedule="linear",
    budget="absolute")``. Overrides ``_generate`` (the step's budget, the metrics) and ``_generate_single_turn``
    (the blended ``generate``): TRL's private methods, tested with trl 1.16."""

    def __init__(self, *args, trb: TRBConfig, **kwargs):
        _check_trl_version()
        self._trb_setup(trb)
        self._trb_early(args, kwargs)
        super().__init__(*args, **kwargs)
        self._trb_refuse(self.generation_config)

    def _generate(self, prompts):
        """Once per generation batch on every process: fixes the step's budget for the single turns below
        (one, or one per tool-calling turn) and logs the step's trb/* metrics (a collective) afterwards."""
        if not self.model.training:  # evaluation: TRL's path, unchanged
            return super()._generate(prompts)
        eps = self.trb.eps_at(self.state.global_step)
        self._trb_eps = eps
        try:
            out = super()._generate(prompts)
        finally:
            self._trb_eps = 0.0
        self._trb_log(eps)
        return out

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        eps = self._trb_eps
        if eps <= 0 or self.use_vllm or not self.model.training:  # TRL's path (vLLM with eps > 0 was refused)
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        student = self.accelerator.unwrap_model(self.model_wrapped)
        with blended_generate(student, self._trb_teacher(), eps, budget=self.trb.budget, tol=self.trb.tol,
                              on_done=self._trb_collect):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)


# --------------------------------------------------------------------------- GKD (trl.experimental)
def _make_gkd_trainer():
    from trl.experimental.gkd import GKDTrainer

    class TRBGKDTrainer(_TRBMixin, GKDTrainer):
        """``trl.experimental.gkd.GKDTrainer`` whose on-policy student generations (the ``lmbda`` fraction)
        come from TRB's blend while ``eps_k > 0``; sequence-level KD (teacher generations) and the loss are
        unchanged. Takes ``trb=TRBConfig(...)``; overrides ``generate_on_policy_outputs``."""

        def __init__(self, *args, trb: TRBConfig, **kwargs):
            _check_trl_version()
            self._trb_setup(trb)
            self._trb_early(args, kwargs)
            super().__init__(*args, **kwargs)
            self._trb_refuse(self.generation_config)

        def generate_on_policy_outputs(self, model, inputs, generation_config):
            parent = GKDTrainer.generate_on_policy_outputs
            teacher = self._trb_teacher()
            # GKD generates only in training_step (where the student may still be in eval mode at step 0)
            if model is teacher or self.accelerator.unwrap_model(model) is teacher:
                return parent(model, inputs, generation_config)  # seq_kd: the teacher's own samples
            eps = self.trb.eps_at(self.state.global_step)
            if eps <= 0:
                out = parent(model, inputs, generation_config)
            else:
                with blended_generate(model, teacher, eps, budget=self.trb.budget, tol=self.trb.tol,
                                      on_done=self._trb_collect):
                    out = parent(model, inputs, generation_config)
            # not gathered: whether a GKD step generates on-policy is drawn per process (random() <= lmbda)
            self._trb_log(eps, gather=False)
            return out

    TRBGKDTrainer.__module__ = __name__
    return TRBGKDTrainer


def __getattr__(name):  # the GKD variant imports trl.experimental (and its warning) only when asked for
    if name == "TRBGKDTrainer":
        cls = _make_gkd_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
