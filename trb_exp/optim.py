"""The one optimizer construction of the project: AdamW and its learning-rate multiplier (linear warmup,
then constant, or times a linear decay). The trainer, the SFT warm start and the embedded-pair
preparation all build theirs here."""

from __future__ import annotations

import torch


def adamw(params, *, lr: float, betas, weight_decay: float, warmup_steps: int, decay_steps: int | None = None,
          floor: float = 0.1):
    """(AdamW, LambdaLR): the multiplier at update u is min(1, (u+1)/warmup) — times max(floor, 1 - u/decay_steps)
    when ``decay_steps`` is given."""
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    warmup = max(1, int(warmup_steps))
    if decay_steps is None:
        factor = lambda u: min(1.0, (u + 1) / warmup)  # noqa: E731
    else:
        factor = lambda u: min(1.0, (u + 1) / warmup) * max(floor, 1 - u / decay_steps)  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def adamw_from_config(params, optim_cfg):
    """``adamw`` with the ``optim.*`` settings of the config (lr, betas, weight_decay, warmup_steps)."""
    return adamw(params, lr=optim_cfg.lr, betas=optim_cfg.betas, weight_decay=optim_cfg.weight_decay,
                 warmup_steps=optim_cfg.warmup_steps)
