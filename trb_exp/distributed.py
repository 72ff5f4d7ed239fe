"""Data parallelism on ``torch.distributed``: ``torchrun --nproc_per_node N -m trb_exp.train ...``.

One process per device. Each rank decodes its contiguous share of the step's prompts, the token-mean
loss is normalised by the response tokens of the WHOLE step over all ranks, gradients are averaged by
DDP (or FSDP2 with ``trainer.strategy=fsdp``), rollout statistics and evaluations are reduced over ranks,
and rank 0 alone writes files. Without torchrun (``WORLD_SIZE`` unset or 1) every function here is the
identity and the trainer is the single-process one, bit for bit.

    ctx = init_distributed("auto")              # reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun sets them)
    rows = ctx.shard(prompts)                   # this rank's contiguous block
    n_tokens = ctx.all_sum(mask.sum())          # the step's response tokens on all ranks
    loss = masked_token_mean(per_tok, mask, n_tokens / ctx.world)   # DDP averages gradients over ranks
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trb_exp.config import ConfigError

STRATEGIES = ("auto", "ddp", "fsdp")
_UNSET = object()


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""  # nccl (GPUs) or gloo (CPUs) under torchrun

    @property
    def comm_device(self) -> torch.device:
        """Where a collective's tensors must live: the rank's GPU for NCCL, the CPU for gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics, summaries, checkpoints and the saved student."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: list, field: str = "trainer.prompts_per_step") -> list:
        """This rank's contiguous block of ``items`` (all ranks get the same count)."""
        if len(items) % self.world:
            raise ConfigError(f"{field}={len(items)}: must be divisible by the number of processes ({self.world}) "
                              "so every rank decodes the same number of prompts")
        n = len(items) // self.world
        return items[self.rank * n : (self.rank + 1) * n]

    def block(self, n: int) -> tuple[int, int]:
        """This rank's [lo, hi) of n items split as evenly as possible (uneven n allowed: evaluation)."""
        q, r = divmod(n, self.world)
        lo = self.rank * q + min(self.rank, r)
        return lo, lo + q + (self.rank < r)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank takes the same branch, e.g. on a stop signal)."""
        return bool(flag) if not self.active else self.all_sum(float(bool(flag))) > 0

    def all_sum(self, x):
        """Sum of a number or tensor over ranks (a float in, a float out)."""
        if not self.active:
            return x
        t = (x.detach().clone() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)).to(self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(x.device) if torch.is_tensor(x) else t.item()

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (any picklable object)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def reduce_metrics(self, m: dict[str, float]) -> dict[str, float]:
        """Per-step rollout statistics over ranks: the mean of the ranks' values (each rank holds the same
        number of rollouts), the max for ``*_max`` keys, the min for ``*_min``. Keys present on only some
        ranks are averaged over those."""
        if not self.active:
            return m
        per = self.gather(m)
        out = {}
        for k in sorted(set().union(*per)):
            vals = [p[k] for p in per if k in p and p[k] is not None]
            if not vals:
                out[k] = None
            elif k.endswith("_max"):
                out[k] = max(vals)
            elif k.endswith("_min"):
                out[k] = min(vals)
            else:
                out[k] = sum(vals) / len(vals)
        return {k: out[k] for k in m} | {k: v for k, v in out.items() if k not in m}

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """The end of a run: every rank is done communicating, then the process group goes (a process that
        exits with gloo threads still connected can abort at interpreter exit). The FSDP2 / DDP wrappers of a
        finished model hold the group through reference cycles: collected first, so that destroying the
        group really closes its connections on every rank, before any rank exits."""
        if self.active and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
            gc.collect()


def submitit_tasks() -> int:
    """The number of tasks of the submitit job this process is one task of (SLURM ``tasks_per_node`` x
    ``nodes``, or submitit's local executor); 0 outside a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 0
    try:
        import submitit

        return int(submitit.JobEnvironment().num_tasks)
    except Exception:  # not inside a running job after all (e.g. the variable leaked into a shell)
        return 0


def export_submitit_env() -> None:
    """A submitit job of several tasks (one process per task: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID on
    SLURM, SUBMITIT_LOCAL_* locally) made to look like a torchrun launch: RANK, WORLD_SIZE, LOCAL_RANK and
    MASTER_ADDR (the job's first host) / MASTER_PORT (drawn from the job id, the same on every task) from
    ``submitit.helpers.TorchDistributedEnvironment``. CUDA_VISIBLE_DEVICES is left alone: every task sees the
    node's GPUs and takes GPU ``LOCAL_RANK``, as under torchrun."""
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def init_distributed(device: str = "auto") -> DistContext:
    """The process group of a ``torchrun`` launch, or of a submitit (SLURM) job with several tasks (NCCL on
    CUDA, gloo on CPU), or a single-process context."""
    if "WORLD_SIZE" not in os.environ and submitit_tasks() > 1:
        export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"device={device!r}: local rank {local_rank} needs GPU {local_rank}, but this node "
                              f"has {torch.cuda.device_count()}: lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world=world, local_rank=local_rank, backend=dist.get_backend())


def rank_device(device: str, ctx: DistContext) -> str:
    """The device of this rank: ``cuda:<local_rank>`` under torchrun on GPUs, else ``device`` unchanged."""
    if ctx.active and (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())):
        return f"cuda:{ctx.local_rank}"
    return device


def rank_seed(seed: int, rank: int) -> int:
    """The sampling seed of a rank: the run's seed on rank 0 (so one process reproduces the single-process
    trainer exactly), a distinct deterministic stream per other rank. Reproducible for a given world size."""
    return int(seed) if rank == 0 else int(seed) * 1_000_003 + rank


def wrap_student(model: torch.nn.Module, ctx: DistContext, strategy: str = "auto") -> torch.nn.Module:
    """DDP (``auto``, ``ddp``: a replica per rank) or FSDP2 (``fsdp``: parameters sharded per decoder layer,
    ``torch.distributed.fsdp.fully_shard``) around the student; the model itself without torchrun."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not ctx.active:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model, "model", model), "layers", [])
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    dev = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2 units of ``model`` (its decoder layers and itself after ``wrap_student(..., "fsdp")``); []
    for a plain or DDP-wrapped model."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp(model: torch.nn.Module) -> bool:
    return bool(fsdp_modules(model))


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool):
    """Gradient accumulation: synchronise gradients over ranks only on the last micro-batch of a step (DDP:
    ``no_sync``; FSDP2: ``set_requires_gradient_sync``, the reduce-scatter waits for the last backward)."""
    if enabled:
        yield
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def full_params(model: torch.nn.Module):
    """FSDP2: every rank holds the whole student for the duration (all-gathered once, not resharded after
    each forward), so ranks may run different numbers of forward passes: generation, where each rank decodes
    until its own rows end, and sharded evaluation. Parameters are resharded on exit. Nothing for a plain or
    DDP model. Memory: the full parameters on every rank while it lasts (gradients and optimizer state stay
    sharded)."""
    mods = fsdp_modules(model)
    if not mods:
        yield
        return
    saved = []
    for m in mods:  # each unit's own setting (the root's is special: it stays unsharded after forward)
        st = m._get_fsdp_state()
        saved.append((st, getattr(st, "_auto_reshard_after_forward", _UNSET),
                      [(g, g.post_forward_mesh_info) for g in getattr(st, "_fsdp_param_groups", [])]))
    for m in mods:
        m.unshard()
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for st, auto, groups in saved:
            if auto is not _UNSET:
                st._auto_reshard_after_forward = auto
            for g, info in groups:
                g.post_forward_mesh_info = info
        for m in mods:
            m.reshard()


def full_state_dict(model: torch.nn.Module, ctx: DistContext) -> dict | None:
    """The whole student's state dict on CPU, on rank 0 (None on the others): gathered from the FSDP2 shards
    (every rank must call this), or the model's own ``state_dict()`` otherwise."""
    if not is_fsdp(model):
        return unwrap(model).state_dict() if ctx.is_main else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if ctx.is_main else None


def sharded_evaluate(ctx: DistContext, evaluate_fn):
    """``evaluate_fn(model, tok, prompts, answers, grade, **kw)`` over this rank's block of the problems,
    gathered into one evaluation of all of them (``combine_evaluations``); ``evaluate_fn`` itself alone."""
    if not ctx.active:
        return evaluate_fn

    def run(model, tokenizer, prompts, answers, grade, **kw):
        lo, hi = ctx.block(len(prompts))
        r = evaluate_fn(model, tokenizer, prompts[lo:hi], answers[lo:hi], grade, **kw) if hi > lo else {}
        parts = ctx.gather((r, hi - lo))
        return combine_evaluations([x for x, _ in parts], [n for _, n in parts])

    return run


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: the model is itself)."""
    return getattr(model, "module", model)


def combine_evaluations(results: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    """One evaluation from the ranks' evaluations of disjoint problem shards of ``sizes`` problems each:
    per-problem means (pass@k, greedy accuracy, mean length and EOS rate: every problem has n samples)
    weighted by the shard sizes; ``pass@1_se`` = sqrt(sum_r (se_r N_r)^2) / N (independent shards)."""
    results, sizes = [r for r, n in zip(results, sizes) if n], [n for n in sizes if n]  # ranks without problems
    total = sum(sizes)
    if total == 0:
        raise ValueError("combine_evaluations: no problems")
    keys = [k for k in results[0] if all(k in r for r in results)]
    out = {}
    for k in keys:
        if k.endswith("pass@1_se"):
            out[k] = math.sqrt(sum((r[k] * n) ** 2 for r, n in zip(results, sizes))) / total
        elif k.endswith(("n_samples",)):
            out[k] = results[0][k]
        elif k.endswith("n_problems"):
            out[k] = sum(r[k] for r in results)
        else:
            out[k] = sum(r[k] * n for r, n in zip(results, sizes)) / total
    return out


def check_strategy(cfg, dist: DistContext) -> None:
    """What the trainer runs under torchrun, checked before any model is loaded."""
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not dist.active:
        return
    dist.shard(list(range(int(cfg.trainer.prompts_per_step))))  # every rank gets the same number of prompts
