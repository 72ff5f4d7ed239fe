"""Trust-Region Behaviour Blending (TRB): the per-token behaviour-policy solver.

Behaviour policy: mu_b = softmax((1-b) logp_S + b logp_T) = pi_S exp(b d) / Z(b), d = logp_T - logp_S, with b the
LARGEST value in [0, 1] such that KL(mu_b || pi_S) <= eps.  mu_b is the I-projection argmin_q KL(q || pi_T)
s.t. KL(q || pi_S) <= eps (stationarity: q ~ pi_T^(1/(1+l)) pi_S^(l/(1+l)), l the multiplier).
Let J = supp pi_S & supp pi_T, q = pi_S restricted to J and renormalised, jump0 = -log pi_S(J).  For 0 < b < 1,
mu_b lives on J and KL(mu_b || pi_S) = jump0 + K(b), K(b) = b E_mu[d] - log E_q[exp(b d)], K(0) = 0 and
K'(b) = b Var_{mu_b}[d] >= 0 ((log Z)' = E_mu[d], (log Z)'' = Var_mu[d]), so KL is non-decreasing in b.
-inf semantics (support = tokens with a finite log-probability):
  * pi_T = 0 < pi_S somewhere: mu_b drops those tokens for every b > 0, so KL jumps at b = 0+ to jump0;
    jump0 >= eps gives b = 0 (mu = pi_S).  Disjoint supports: jump0 = inf, b = 0.
  * pi_S = 0 < pi_T somewhere: KL(pi_T || pi_S) = inf, so b = 1 is infeasible (jump at b = 1).  If even
    lim_{b->1} KL <= eps the supremum is not attained and b = nextafter(1, 0) is returned.
Solver: safeguarded Newton on H(b) = sqrt(K) - sqrt(eps - jump0) (same root as f = KL - eps and nearly linear,
K ~ b^2 Var/2; H' = b Var / (2 sqrt K) is finite at 0), from b0 = sqrt(2 (eps - jump0) / Var_q[d]), inside a
bracket [lo feasible, hi] shrunk by every evaluation, bisecting whenever a Newton step leaves it.
K is summed as sum_i q_i phi(v_i), v = log(mu/q), phi(v) = 1 + (v-1) e^v >= 0 (Taylor series for small |v|):
non-negative terms, first-order insensitive to the rounding of log Z, so float32 stays accurate down to eps ~ 1e-7.
Layout (the ``trb_exp.blend`` wing): ``ops`` (the result type, NaN-free log-softmax, geometric mixture, KL divergences, EOS merge),
``kernel`` (the K / Var / log mu evaluation both solvers share), ``solver`` (the exact solver
:func:`trust_region_blend` and its bisection reference), ``device`` (the sync-free
:func:`trust_region_blend_device` of the static decode engine). Import the public names from here.
"""

from __future__ import annotations

from trb_exp.blend.device import trust_region_blend_device
from trb_exp.blend.ops import (
    BlendResult,
    geometric_mixture,
    kl_behavior_student,
    kl_divergence,
    kl_teacher_student,
    merge_eos,
    safe_log_softmax,
)
from trb_exp.blend.solver import trust_region_blend, trust_region_blend_bisection

__all__ = [
    "BlendResult",
    "trust_region_blend",
    "trust_region_blend_bisection",
    "trust_region_blend_device",
    "geometric_mixture",
    "kl_divergence",
    "kl_behavior_student",
    "kl_teacher_student",
    "merge_eos",
    "safe_log_softmax",
]
