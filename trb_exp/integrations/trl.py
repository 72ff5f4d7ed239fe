"""TRB rollouts inside TRL: a drop-in for ``trl.DistillationTrainer`` (and GKD), tested against TRL 1.16.

Change one class and keep your accelerate/DeepSpeed setup, dataset and loss::

    from trb_exp.integrations.trl import TRBConfig, TRBDistillationTrainer
    trainer = TRBDistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
                                     train_dataset=ds, processing_class=tok,
                                     trb=TRBConfig(eps0=0.5, warmup_steps=50))   # schedule="linear"

While the step's budget ``eps_k = budget_at(k, schedule, eps0, warmup_steps)`` is > 0, the student's rollouts
are drawn from the blend ``mu_b ∝ pi_S^(1-b) pi_T^b`` with the largest ``b`` such that
``KL(mu_b || pi_S) <= eps_k`` at every decoded token (``trb_exp.blending.trust_region_blend``, through
``trb_exp.rules.TrustRegionSampler``: the project's own solver and rule). Evaluation and the steps after the
warmup take TRL's own path unchanged. TRL's loss is untouched: TRB only changes which prefixes are visited.

How: TRL offers no way to hand ``generate`` a ``logits_processor``. ``TRBDistillationTrainer`` overrides the
private ``DistillationTrainer._generate`` (once per generation batch: the step's budget, then the metrics) and
``_generate_single_turn`` (hence the pin to the tested TRL range): for the duration of the latter the unwrapped
student's ``generate`` is replaced by a wrapper that adds a ``TRBLogitsProcessor``, and it is restored
afterwards (also on errors). The processor advances the teacher by one token per call with
its own KV cache (prompt attention mask and positions as ``decode.backend.sample``), blends, and returns ``log mu``
(times T when T != 1, because transformers' temperature warper runs after custom processors), so the token
transformers samples is drawn from ``mu``. Same seed, same tokens and betas as
``decode.backend.sample(..., TrustRegionSampler(eps))``.

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

import warnings

import torch

from trb_exp.integrations.generate import (
    TRBConfig,
    TRBConfigError,
    TRBLogitsProcessor,
    blended_generate,
    check_generation_config,
    refusals,
)

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


def _output_rows(model) -> int | None:
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except Exception:  # noqa: BLE001 - a model without output embeddings: fall back to the config
        cfg = getattr(model, "config", None)
        return getattr(cfg.get_text_config(), "vocab_size", None) if cfg is not None else None


def _tokenizer_of(obj):
    """A tokenizer from a tokenizer, a processor (its ``.tokenizer``), or a model or path it was saved with
    (``AutoTokenizer.from_pretrained(name_or_path)``); None when there is none."""
    if obj is None:
        return None
    if hasattr(obj, "get_vocab"):
        return obj
    if hasattr(getattr(obj, "tokenizer", None), "get_vocab"):
        return obj.tokenizer
    path = obj if isinstance(obj, str) else getattr(obj, "name_or_path", None)
    if not path:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # no tokenizer saved there
        return None


def _check_trl_version() -> None:
    import trl
    from packaging.version import Version

    v = Version(trl.__version__)
    if not (Version(TESTED_TRL[0][2:]) <= v < Version(TESTED_TRL[1][1:])):
        warnings.warn(f"trb_exp.integrations.trl was tested with trl{','.join(TESTED_TRL)} and overrides private "
                      f"TRL methods; found trl {trl.__version__}", stacklevel=3)


# --------------------------------------------------------------------------- shared trainer logic
class _TRBMixin:
    """What both trainers share: the budget, the refusals, the per-step statistics and their logging."""

    trb: TRBConfig

    def __init__(self, *args, trb: TRBConfig, teacher_tokenizer=None, **kwargs):
        """The trainer's own arguments plus ``trb``: refused settings fail before (and after) TRL's __init__.
        ``teacher_tokenizer``: the teacher's tokenizer, compared with the student's token by token (default:
        the one saved with the teacher, read from its ``name_or_path``)."""
        _check_trl_version()
        self._trb_setup(trb)
        self._trb_early(args, kwargs, teacher_tokenizer)
        super().__init__(*args, **kwargs)
        self._trb_refuse(self.generation_config)

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

    def _trb_early(self, args, kwargs, teacher_tokenizer=None, names=("model", "teacher_model", "args")) -> None:
        """The refusals that can be decided before TRL's own __init__ (which imports vLLM when use_vllm=True,
        words the vocabulary check its own way and lets transformers reject a temperature of 0 with a traceback)."""
        got = dict(zip(names, args))
        got.update({k: kwargs[k] for k in names if k in kwargs})
        student, teacher, targs = got.get("model"), got.get("teacher_model"), got.get("args")
        loaded = [m if hasattr(m, "get_output_embeddings") else None for m in (student, teacher)]
        student_tok = _tokenizer_of(kwargs.get("processing_class") or student)
        teacher_tok = _tokenizer_of(teacher_tokenizer or teacher)
        refusals(use_vllm=bool(getattr(targs, "use_vllm", False)), eps_first=self.trb.eps_at(0),
                 student_vocab=_output_rows(loaded[0]) if all(loaded) else None,
                 teacher_vocab=_output_rows(loaded[1]) if all(loaded) else None,
                 token_ids=(student_tok.get_vocab(), teacher_tok.get_vocab()) if student_tok and teacher_tok else None,
                 temperature=getattr(targs, "temperature", None))
        if student_tok is not None and teacher_tok is None and teacher is not None:
            warnings.warn("TRB: the teacher's tokenizer was not found next to it, so the two tokenizers' token -> id "
                          "maps were not compared; pass teacher_tokenizer=...", stacklevel=4)

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
from trl import (
    DistillationTrainer,  # the integration needs TRL: pip install -e ".[trl]"
)


class TRBDistillationTrainer(_TRBMixin, DistillationTrainer):
    """``trl.DistillationTrainer`` whose training rollouts come from TRB's blend while ``eps_k > 0``.

    Takes every argument of ``DistillationTrainer`` plus ``trb=TRBConfig(eps0, warmup_steps, schedule="linear",
    budget="absolute")``. Overrides ``_generate`` (the step's budget, the metrics) and ``_generate_single_turn``
    (the blended ``generate``): TRL's private methods, tested with trl 1.16."""

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
