"""KL-budget schedules: pure functions of the training step.

Every schedule maps the step ``k`` (0-based) to a budget ``eps_k >= 0`` from its initial value
``eps0`` and its horizon ``K = warmup_steps``. All but ``constant`` reach 0 at step ``K`` and stay
there, after which TRB is plain OPD. With ``budget: relative`` the same value is read as the
fraction ``rho_k`` of the per-prefix teacher-student gap ``KL(pi_T||pi_S)``.

    linear       eps0 * (1 - k/K)                     (the paper)
    cosine       eps0 * (1 + cos(pi k/K)) / 2
    exponential  eps0 * final_ratio ** (k/K)          (geometric decay, then 0 at K)
    step         eps0                                  (full budget, then 0 at K)
    constant     eps0 for every step, K unused         (fixed-eps blending, the paper's ablation)
    none         0                                     (plain OPD)
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "exponential", "step", "constant", "none")


def budget_at(step: int, name: str, eps0: float, warmup_steps: int, final_ratio: float = 0.01) -> float:
    """The budget eps_k of training step ``step`` under schedule ``name``."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name={name!r}: choose one of {', '.join(SCHEDULES)}")
    if eps0 < 0:
        raise ValueError(f"schedule.eps0={eps0}: a KL budget must be >= 0")
    if name == "none":
        return 0.0
    if name == "constant":
        return float(eps0)
    if step >= warmup_steps:
        return 0.0
    frac = step / warmup_steps
    if name == "linear":
        return eps0 * (1.0 - frac)
    if name == "cosine":
        return eps0 * 0.5 * (1.0 + math.cos(math.pi * frac))
    if name == "exponential":
        return eps0 * final_ratio**frac
    return float(eps0)  # step
