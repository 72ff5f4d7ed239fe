"""The public bisection reference (blending.trust_region_blend_bisection) agrees with the Newton solver and
keeps the contract: kl <= eps, and the budget used wherever beta < 1."""

import torch

from trb_exp.blending import trust_region_blend, trust_region_blend_bisection


def test_bisection_and_newton_agree_on_random_rows():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 300, generator=g) * 3
    t = 0.6 * s + torch.randn(64, 300, generator=g) * 2
    t[:4] = s[:4]  # identical rows: the exact case beta = 1
    s[4:8, :50] = float("-inf")  # masked tokens in the student
    eps = torch.logspace(-3, 0.5, 64)
    newton, bis = trust_region_blend(s, t, eps), trust_region_blend_bisection(s, t, eps)
    torch.testing.assert_close(bis.beta, newton.beta, atol=3e-6, rtol=0)
    assert (bis.kl <= eps + 1e-6).all() and (newton.kl <= eps + 1e-6).all()
    inner = bis.beta < 1 - 1e-6
    assert inner.sum() > 40 and (bis.kl[inner] >= eps[inner] * (1 - 1e-3)).all()
    assert (bis.beta[:4] == 1).all() and bis.iters[inner].float().mean() > newton.iters[inner].float().mean()
