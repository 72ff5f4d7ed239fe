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


def accumulate_step(model, optimizer, schedule, micro_batches, *, grad_clip: float, params=None):
    """One optimizer step by gradient accumulation, the one loop of the trainer (``trainer.update``), the SFT
    warm start and the embedded pair's preparation: ``micro_batches`` are callables, each returning its
    micro-batch's loss ALREADY normalised as its share of the step's token mean (the step's tokens, over all
    ranks under torchrun); each is backpropagated, gradients are synchronised over ranks on the last one only
    (``distributed.grad_sync``: DDP ``no_sync`` / FSDP2 without reduce-scatter before it), clipped to
    ``grad_clip`` (the norm over all ranks), then one optimizer and one schedule step.

    Returns (the sum of the micro-batch losses on this rank, the gradient norm before clipping, a tensor).
    ``model`` is the module the losses run through (a DDP / FSDP2 wrapper under torchrun); ``params``
    defaults to its parameters."""
    from trb_exp.distributed import grad_sync

    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    last = len(micro_batches) - 1
    for i, loss_of in enumerate(micro_batches):
        with grad_sync(model, enabled=i == last):
            loss = loss_of()
            loss.backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters() if params is None else params, grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of DTensor gradients
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    schedule.step()
    return total, grad_norm
