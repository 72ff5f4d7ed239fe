"""The trust-region budget is respected AND used: on every response token the realised KL(mu || pi_S) is at
most eps, and wherever the blend stops short of the teacher (beta < 1) it is at least eps (1 - 1e-3): the
solver returns the LARGEST feasible beta, so a beta < 1 that leaves budget unspent is a bug (e.g. a halved
beta would pass an upper-bound-only check)."""

import torch


def assert_budget_used(ro, eps=None, rtol=1e-3, atol=1e-6) -> int:
    """Check a TRB rollout's per-token diagnostics; ``eps`` None reads the per-token budget the rule logged
    (relative budgets). Returns the number of response tokens with beta < 1 (callers assert it is > 0: the
    random tiny test pairs are nearly uniform, KL(pi_T || pi_S) ~ 0.006-0.017 nats per token, so a budget
    above ~0.02 gives beta = 1 everywhere and the check would be vacuous)."""
    d, m = ro.diagnostics, ro.response_mask.bool()
    kl, beta = d["kl_behavior_student"][m], d["beta"][m]
    e = d["eps"][m] if eps is None else torch.full_like(kl, float(eps))
    if eps is not None:
        assert torch.allclose(d["eps"][m], e), "the rule logged another budget than the one asked for"
    assert (kl <= e + atol).all(), f"budget exceeded: max KL - eps = {(kl - e).max().item():.3g}"
    below = beta < 1
    short = kl[below] < e[below] * (1 - rtol)
    assert not short.any(), (f"budget left unused where beta < 1: {int(short.sum())} tokens, e.g. KL "
                             f"{kl[below][short][0].item():.6g} < eps {e[below][short][0].item():.6g}")
    return int(below.sum())


def record_rollouts(monkeypatch, module):
    """Wrap ``module.sample`` (train.py's training rollouts) and return the list the rollouts go to."""
    real, out = module.sample, []

    def rec(*a, **kw):
        ro = real(*a, **kw)
        out.append(ro)
        return ro

    monkeypatch.setattr(module, "sample", rec)
    return out
