"""trb_exp.optim: the one AdamW + LR-multiplier construction (trainer, SFT warm start, pair preparation)."""

import torch

from trb_exp.optim import adamw


def _factors(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def test_warmup_then_constant_and_warmup_then_decay():
    p = [torch.nn.Parameter(torch.zeros(2))]
    _, sched = adamw(p, lr=1.0, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=4)
    assert _factors(sched, 7) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    _, sched = adamw(p, lr=2.0, betas=(0.9, 0.98), weight_decay=0.01, warmup_steps=2, decay_steps=10)
    # prepare's schedule: min(1, (u+1)/2) * max(0.1, 1 - u/10), times lr 2
    want = [2 * min(1.0, (u + 1) / 2) * max(0.1, 1 - u / 10) for u in range(12)]
    assert _factors(sched, 12) == want and want[-1] == 2 * 0.1
    _, sched = adamw(p, lr=1.0, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0)
    assert _factors(sched, 2) == [1.0, 1.0]  # no warmup: full rate from the first update
    opt, _ = adamw(p, lr=0.5, betas=[0.8, 0.9], weight_decay=0.1, warmup_steps=1)
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["weight_decay"] == 0.1
