"""The decode front: ``sample`` draws rollouts from a (student, teacher) pair under a behaviour sampler, on the
backend its ``RolloutConfig`` names. ``backend(config)`` is the one function that maps a config to a backend;
``resolve_engine`` turns ``engine=auto`` into the engine the loaded models allow.

    eager   ``decode/eager.py``: one Hugging Face forward per model and token (any architecture)
    static  ``decode/static.py``: preallocated KV caches, fixed-shape steps, no per-token host sync
    vllm    ``decode/vllm.py``: this process's in-process vLLM engine (the TRB pair model, or the student alone)

A backend is a function ``(student, teacher, prompt_ids, prompt_mask, sampler, *, max_new_tokens, eos_id, pad_id,
generator, keep_teacher_logprobs, eos_ids) -> Rollout``. A new engine (vLLM) is a module in ``decode/``, a value
in ``config.ENGINES`` and a branch in ``backend`` (and in ``resolve_engine`` if ``auto`` may pick it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

import torch
from torch import Tensor

from trb_exp.config import ConfigError
from trb_exp.decode.config import RolloutConfig
from trb_exp.decode.eager import sample_eager
from trb_exp.decode.record import Rollout

__all__ = ["backend", "resolve_engine", "sample"]

Backend = Callable[..., Rollout]


def backend(config: RolloutConfig) -> Backend:
    """The decode function of ``config.engine`` with the config's knobs bound (``auto`` must be resolved first)."""
    if config.engine == "eager":
        return partial(sample_eager, teacher_stats=config.teacher_stats, topk=config.topk)
    if config.engine == "static":
        from trb_exp.decode.static import sample_static  # loads the static engine only when it decodes

        return partial(sample_static, teacher_stats=config.teacher_stats, topk=config.topk,
                       sync_every=config.sync_every, compile=config.compile, compact=config.compact,
                       solver_iters=config.solver_iters)
    if config.engine == "vllm":
        from trb_exp.decode.vllm import sample_vllm  # this process's vLLM engine (decode/vllm.py)

        return partial(sample_vllm, teacher_stats=config.teacher_stats, topk=config.topk)
    raise ValueError(f"rollout.engine={config.engine!r}: resolve it with decode.backend.resolve_engine first")


def resolve_engine(config: RolloutConfig, student, teacher) -> RolloutConfig:
    """``engine=auto`` (the default): the static engine when it can run both models (Llama, Qwen2/3, Mistral), else
    the eager loop, said in one line; ``static`` on another architecture is a one-line ``ConfigError``."""
    from trb_exp.decode.static_lm import UnsupportedModel, check_supported

    if config.engine in ("eager", "vllm"):  # vllm: checked at setup, before the models loaded (vllm.resolve_vllm)
        return config
    for name, model in (("model.student", student), ("model.teacher", teacher)):
        try:
            check_supported(model)
        except UnsupportedModel as e:
            if config.engine == "static":
                raise ConfigError(f"{name}: {e}") from None
            print(f"[rollout] rollout.engine=auto: {name} is not an architecture the static engine runs; "
                  "decoding with the eager loop", flush=True)
            return config.eager()
    return replace(config, engine="static")


@torch.no_grad()
def sample(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, sampler, *, max_new_tokens: int, eos_id: int,
           pad_id: int, generator: torch.Generator | None = None, keep_teacher_logprobs: bool = True,
           eos_ids: Sequence[int] = (), config: RolloutConfig | None = None, **options) -> Rollout:
    """Decode ``max_new_tokens`` at most from left-padded prompts [B, P] under ``sampler``.

    ``config``: the decode backend and its knobs; or give its fields as keyword ``options`` (``engine="static"``,
    ``teacher_stats="topk"``, ``sync_every=4``, ...), not both.

    ``eos_ids``: every id that ends a sequence for either model (e.g. a Base student's ``<|endoftext|>`` and an
    instruct teacher's ``<|im_end|>``). When it holds ids other than ``eos_id``, both models' next-token logits are
    canonicalised with ``blending.merge_eos`` before the sampler sees them: the EOS probabilities are summed into one
    event at ``eos_id`` (the student's), so every sampler (the TRB solver and its KL budget included) works on the
    merged distributions, the sampled event is emitted as ``eos_id``, and the stored teacher log-probs are merged
    too. With no other id this costs nothing.

    ``teacher_stats``: ``full`` keeps the teacher's [B, T, V] log-probs when it ran; ``topk`` keeps only the
    student's top-``topk`` ids and the teacher's log-probs there, at the sampled token and its entropy (O(B*T*k),
    ``Rollout`` docstring).
    """
    if config is None:
        config = RolloutConfig(**options)
    elif options:
        raise TypeError(f"sample() got both config= and its fields {sorted(options)}")
    return backend(config)(student, teacher, prompt_ids, prompt_mask, sampler, max_new_tokens=max_new_tokens,
                           eos_id=eos_id, pad_id=pad_id, generator=generator,
                           keep_teacher_logprobs=keep_teacher_logprobs, eos_ids=eos_ids)
