"""TRB inside vLLM: sample rollouts from the trust-region blend of a student and a teacher with plain ``vllm.LLM``.

    from vllm import LLM, SamplingParams
    from trb_exp.integrations.vllm import make_pair_checkpoint, set_budget   # registers TRBPair
    make_pair_checkpoint("student/", "teacher/", "pair/")
    llm = LLM("pair/", enforce_eager=True)
    set_budget(llm, 0.5)                                                      # eps: nats per token
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, seed=0, logprobs=0))

Importing this module registers the architecture ``TRBPair`` (``trb_exp.integrations.vllm_pair``) with vLLM, and
so does the ``vllm.general_plugins`` entry point ``trb_pair`` (pyproject.toml), so a separate vLLM process (a
server, a Ray rollout worker) finds it once trb_exp is installed. The rule is one per engine, set between
``generate`` calls: ``set_budget`` (TRB, fixed_blend), ``set_rule`` (any of the project's samplers that are a
function of the two towers' logits: trust region, mixture, student, teacher). Keep ``SamplingParams``'
temperature at 1 and no top-k/top-p: the rule's temperature is the rule's (``set_budget(..., temperature=)``),
and vLLM's processors act after the rule.

Weight sync: ``sync_student_weights(llm, state_dict)`` (a TRBPair engine: the student tower) and
``sync_weights(llm, state_dict)`` (an engine of the student alone) reload the weights in place through vLLM's
``reload_weights``, reset the prefix cache and VERIFY the engine now holds them (per-parameter checksums read
back through ``apply_model``): a sync that silently does nothing raises ``WeightSyncError``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from vllm import ModelRegistry

from trb_exp.config import ConfigError
from trb_exp.integrations.vllm_checkpoint import (
    ARCHITECTURES,
    CPU_HEAD_SIZES,
    make_pair_checkpoint,
    vllm_support_problem,
)
from trb_exp.rules.base import Sampler
from trb_exp.rules.skd import SKDSampler
from trb_exp.rules.trust_region import TrustRegionSampler
from trb_exp.schedules import BUDGETS

__all__ = ["ARCHITECTURES", "CPU_HEAD_SIZES", "Checksum", "WeightSyncError", "make_pair_checkpoint", "register",
           "set_budget", "set_rule", "sync_student_weights", "sync_weights", "vllm_support_problem", "weight_checksums"]

ARCHITECTURE = "TRBPair"


def register() -> None:
    """Register ``TRBPair`` with vLLM's model registry (lazily: the class is imported when a model needs it).
    The ``vllm.general_plugins`` entry point; idempotent."""
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "trb_exp.integrations.vllm_pair:TRBPair")


register()


class WeightSyncError(RuntimeError):
    """The engine does not hold the weights just synced into it (the sync silently did nothing)."""


# ------------------------------------------------------------------------------------------------ the rule
def _put_sampler(model, sampler: Sampler) -> None:
    if not hasattr(model, "sampler"):
        raise ConfigError(f"vllm: the engine's model is {type(model).__name__}, not TRBPair; a rule is set on an "
                          "engine built from make_pair_checkpoint's directory")
    model.sampler = sampler


def set_rule(llm, sampler: Sampler) -> None:
    """Make the TRBPair engine ``llm`` sample from ``sampler`` (e.g. ``rule.at(step, temperature)``) from its next
    ``generate`` on. SKD is refused: it draws its proposal and replacement inside the rule, which vLLM's seeded
    per-request sampler cannot reproduce."""
    if isinstance(sampler, SKDSampler):
        raise ConfigError("rollout.engine=vllm: SKD samples its proposal and replacement inside the rule, which "
                          "vLLM's per-request sampler cannot reproduce; use rollout.engine=static for method=skd")
    if not isinstance(sampler, Sampler):
        raise ConfigError(f"vllm.set_rule: {sampler!r} is not a trb_exp sampler (trb_exp.rules: Rule.at(step))")
    llm.apply_model(functools.partial(_put_sampler, sampler=sampler))


def set_budget(llm, eps: float, budget: str = "absolute", temperature: float = 1.0) -> None:
    """TRB's budget for the TRBPair engine's next rollouts: ``budget="absolute"``: KL(mu_b||pi_S) <= eps nats per
    token (eps = 0: the student, eps = inf: the teacher); ``"relative"``: eps is a fraction rho in [0, 1] of each
    prefix's KL(pi_T||pi_S) (the ``schedule`` group's ``budget: relative``). ``temperature``: the rule's sampling
    temperature (both towers' logits are divided by it before blending)."""
    if budget not in BUDGETS:
        raise ConfigError(f"budget={budget!r}: use one of {', '.join(BUDGETS)}")
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps >= 0):  # NaN fails >= 0
        raise ConfigError(f"eps={eps!r}: the trust-region budget must be a number >= 0 (nats per token; inf: the "
                          "teacher)")
    if budget == "relative" and eps > 1:
        raise ConfigError(f"eps={eps!r}: a relative budget is a fraction of KL(pi_T||pi_S): use a value in [0, 1]")
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature!r}: a sampling temperature must be > 0")
    set_rule(llm, TrustRegionSampler(float(eps), budget=budget, temperature=float(temperature)))


# ------------------------------------------------------------------------------------------ weight sync
class Checksum(NamedTuple):
    """A parameter's fingerprint in float64: ``kind="values"``: the sum and the sum of squares of its values (equal
    values give equal sums, compared exactly); ``"row_sums"``: of its rows' sums, for a linear weight vLLM's CPU
    backend packed away (an empty parameter), read by running the packed layer on a row of ones (compared to 1e-4)."""

    kind: str
    dtype: str
    total: float
    square: float


def _fingerprint(kind: str, w: torch.Tensor) -> Checksum:
    w = w.detach().double()
    return Checksum(kind, str(w.dtype), w.sum().item(), w.square().sum().item())


def _checksums(model, prefix: str) -> dict[str, Checksum]:
    """The fingerprint of every parameter under the module ``prefix``, by name (runs inside the engine)."""
    out = {}
    for mod_name, module in (model.get_submodule(prefix) if prefix else model).named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            name, dtype = f"{mod_name}.{leaf}".lstrip("."), str(p.dtype).removeprefix("torch.")
            if p.numel() > 0:
                out[name] = _fingerprint("values", p)._replace(dtype=dtype)
            elif leaf == "weight" and hasattr(module, "cpu_linear"):
                ones = torch.ones(1, module.input_size_per_partition, dtype=p.dtype)
                out[name] = _fingerprint("row_sums", module.cpu_linear(ones, p, None)[0])._replace(dtype=dtype)
    return out


def weight_checksums(llm, prefix: str = "") -> dict[str, Checksum]:
    """The engine's parameter fingerprints under the module ``prefix`` ("student" in a TRBPair), by name."""
    return llm.apply_model(functools.partial(_checksums, prefix=prefix))[0]


_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _expected_checksums(state_dict: dict[str, torch.Tensor], have: dict[str, Checksum]) -> dict[str, Checksum]:
    """The fingerprints the engine's parameters must have after loading ``state_dict`` (Hugging Face names), in the
    engine's dtype: of the same tensor, or of the concatenated fused projections (q, k, v -> qkv_proj; gate, up ->
    gate_up_proj)."""
    out = {}
    for name, c in have.items():
        module, _, leaf = name.rpartition(".")
        parent, _, kind = module.rpartition(".")
        parts = [f"{parent}.{p}.{leaf}" for p in _FUSED[kind]] if kind in _FUSED else [name]
        if all(p in state_dict for p in parts):
            w = torch.cat([state_dict[p].detach().to(getattr(torch, c.dtype)) for p in parts])
            out[name] = _fingerprint(c.kind, w if c.kind == "values" else w.double().sum(1))._replace(dtype=c.dtype)
    return out


def _same(have: Checksum, want: Checksum) -> bool:
    if have.kind == "values":
        return have == want  # the same values give the same float64 sums
    scale = math.sqrt(max(want.square, 0.0))  # the GEMM's rounding: relative to the row sums' norm
    return (math.isclose(have.square, want.square, rel_tol=1e-4, abs_tol=1e-8)
            and abs(have.total - want.total) <= 1e-4 * scale + 1e-8)


def _verify(llm, state_dict, prefix: str) -> None:
    have = weight_checksums(llm, prefix)
    want = _expected_checksums(state_dict, have)
    if not want:
        raise WeightSyncError(f"weight sync: none of the engine's {len(have)} parameters is named in the state "
                              "dict; give the student's Hugging Face state_dict (model.state_dict())")
    stale = [n for n, w in want.items() if not _same(have[n], w)]
    if stale:
        raise WeightSyncError(f"weight sync did not take: {len(stale)} of {len(want)} checked parameters differ "
                              f"from the state dict (first: {prefix + '.' if prefix else ''}{stale[0]})")


def _reload(llm, weights: list[tuple[str, torch.Tensor]]) -> None:
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()


def sync_weights(llm, state_dict: dict[str, torch.Tensor]) -> None:
    """Load the student's ``state_dict`` (Hugging Face names) into an engine of the student alone, in place, and
    verify it took (else ``WeightSyncError``)."""
    _reload(llm, [(k, v.detach()) for k, v in state_dict.items()])
    _verify(llm, state_dict, "")


def sync_student_weights(llm, state_dict: dict[str, torch.Tensor]) -> None:
    """Load the student's ``state_dict`` (Hugging Face names) into the student tower of a TRBPair engine, in
    place, and verify it took (else ``WeightSyncError``); the teacher is untouched."""
    _reload(llm, [(f"student.{k}", v.detach()) for k, v in state_dict.items()])
    _verify(llm, state_dict, "student")
