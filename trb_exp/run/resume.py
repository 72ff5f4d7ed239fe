"""Which checkpoint a run continues from, and whether its run directory may hold it.

``resume_from(cfg, run_dir)``: ``trainer.resume=auto`` (the newest checkpoint of this run dir),
``never`` (a fresh start in an empty run dir) or a path (a checkpoint or a run dir holding one: a fork).
A checkpoint that fails ``state.verify_checkpoint`` is skipped with one warning line for the next older
intact one; none intact is one line and exit 2 unless ``trainer.resume_fallback=scratch`` (start afresh).
A damaged checkpoint named by ``trainer.resume=PATH`` is one line naming the damaged file.
A finished run's directory is refused (``rundir.FinishedRun``), and so is a checkpoint written with
another config, except for ``RESUMABLE_CHANGES`` (how long the run goes on, how it checkpoints and logs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from trb_exp.config import ConfigError
from trb_exp.logger import read_rows
from trb_exp.run.rundir import FinishedRun
from trb_exp.run.state import CHECKSUMS_FILE, STATE_FILE, list_checkpoints, verify_checkpoint

# keys a resumed run may change: how long it runs, how it checkpoints, logs and shows progress, where
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.resume", "trainer.resume_fallback", "trainer.clip_max_new_tokens",
                     "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.progress", "trainer.eval_every",
                     "trainer.save_student", "logger.", "device", "threads")


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config containers, except ``RESUMABLE_CHANGES``."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(old), flat(new)
    clipped = {"trainer.max_new_tokens"} if b.get("trainer.clip_max_new_tokens") else set()  # set at setup, from it
    return sorted(k for k in (set(a) | set(b)) - clipped
                  if a.get(k) != b.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r))
                                                      for r in RESUMABLE_CHANGES))


FALLBACKS = ("fail", "scratch")  # trainer.resume_fallback: when no checkpoint of the run is intact


def resume_from(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from (None: a fresh start), after checking that ``run_dir``
    holds no other run: a finished run, or (trainer.resume=never) an unfinished one, is one line.
    A damaged checkpoint (``state.verify_checkpoint``) is skipped for the next older intact one."""
    how = str(cfg.trainer.get("resume", "auto"))
    fallback = cfg.trainer.get("resume_fallback", "fail")
    if fallback not in FALLBACKS:
        raise ConfigError(f"trainer.resume_fallback={fallback!r}: use fail (no intact checkpoint: stop, exit 2) "
                          "or scratch (start the run afresh)")
    if (run_dir / "summary.json").exists():
        raise FinishedRun(f"run dir {run_dir} holds a finished run (summary.json); leave it alone and give this "
                          "run a new hydra.run.dir (or none: each run gets its own)")
    own = list_checkpoints(run_dir / "checkpoints")
    started = bool(own) or (run_dir / "metrics.jsonl").exists()
    if how == "never":
        if started:
            raise ConfigError(f"trainer.resume=never: run dir {run_dir} already holds a run; resume it with "
                              "trainer.resume=auto, or give a new hydra.run.dir")
        return None
    ckpt = newest_intact(own, "trainer.resume=auto", fallback) if how == "auto" else _named(how, fallback)
    if how != "auto" and started and ckpt is not None and ckpt.parent.parent.resolve() != run_dir.resolve():
        raise ConfigError(f"trainer.resume={how!r}: run dir {run_dir} already holds another run; "
                          "resume into a new hydra.run.dir")
    new = OmegaConf.to_container(cfg, resolve=True)
    if ckpt is not None:
        old = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True).get("meta", {}).get("config")
        what = f"checkpoint {ckpt}"
    elif started and (run_dir / ".hydra" / "config.yaml").is_file():
        old, what = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False), f"run dir {run_dir}"
    else:
        return None
    changed = config_changes(old or {}, new)
    if changed:
        raise ConfigError(f"{what} was written with another config ({', '.join(changed[:4])} differ); resume with "
                          "the same command, or give a new hydra.run.dir (trainer.resume=never)")
    return ckpt


def _named(how: str, fallback: str) -> Path:
    """``trainer.resume=PATH``: a checkpoint (it must be intact) or a run directory holding some (its newest
    intact one)."""
    p = Path(how).expanduser()
    if (p / STATE_FILE).is_file() or (p / CHECKSUMS_FILE).is_file():
        damaged = verify_checkpoint(p)
        if damaged is not None:
            raise ConfigError(f"trainer.resume={how!r}: {damaged[0]}: {damaged[1]}; resume from another checkpoint "
                              "(an older step_<k> beside it)")
        return p
    found = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
    if not found:
        raise ConfigError(f"trainer.resume={how!r}: no checkpoint there; give a checkpoints/step_<k> directory, "
                          "a run directory holding one, auto (the default) or never")
    ckpt = newest_intact(found, f"trainer.resume={how!r}", "fail")
    assert ckpt is not None  # "fail" raises instead
    return ckpt


def newest_intact(ckpts: list[Path], what: str, fallback: str) -> Path | None:
    """The newest intact checkpoint of ``ckpts`` (oldest first); each damaged one skipped on the way is one
    warning line on stderr naming the file and what is wrong. None intact: None (a fresh start) if
    ``fallback`` is ``scratch``, else a ``ConfigError``."""
    first = None
    for ckpt in reversed(ckpts):
        damaged = verify_checkpoint(ckpt)
        if damaged is None:
            return ckpt
        first = first or damaged
        print(f"[resume] warning: skipping checkpoint {ckpt}: {damaged[0].relative_to(ckpt)}: {damaged[1]}",
              file=sys.stderr, flush=True)
    if first is None:
        return None
    if fallback == "scratch":
        print(f"[resume] warning: no intact checkpoint in {ckpts[0].parent}; trainer.resume_fallback=scratch: "
              "starting the run afresh", file=sys.stderr, flush=True)
        return None
    raise ConfigError(f"{what}: no intact checkpoint in {ckpts[0].parent} (newest: {first[0]}: {first[1]}); "
                      "set trainer.resume_fallback=scratch to start the run afresh")


def seed_metrics(src: Path, dst: Path, step: int) -> None:
    """A run resumed from another run's checkpoint starts its record with that run's rows up to ``step``."""
    if src.is_file() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in read_rows(src) if r.get("step", 0) <= step))


def restore(state, train_student, ckpt: Path, run_dir: Path, dist) -> int:
    """Load checkpoint ``ckpt`` into ``state`` (and the FSDP2 shards of ``train_student``), with this rank's
    sampling stream; a checkpoint of another run starts this run's record with that run's rows (a fork).
    Returns the step the run resumes at."""
    from trb_exp.distributed import is_fsdp
    from trb_exp.run.state import (
        load_checkpoint,
        load_sharded_checkpoint,
        set_rng_state,
        sharded,
    )

    if sharded(ckpt) != is_fsdp(train_student):
        raise ConfigError(f"trainer.resume: {ckpt} holds {'sharded (FSDP2)' if sharded(ckpt) else 'whole'} "
                          "student and optimizer states; resume it with the trainer.strategy that wrote it")
    payload = load_sharded_checkpoint(state, train_student, ckpt) if sharded(ckpt) else load_checkpoint(state, ckpt)
    if dist.active:
        rngs = payload.get("meta", {}).get("rng_ranks") or []
        if len(rngs) != dist.world:
            raise ConfigError(f"trainer.resume: {ckpt} was written by {len(rngs) or 1} process(es); resume it "
                              f"with the same --nproc_per_node (here {dist.world})")
        set_rng_state(rngs[dist.rank], state.generator)
    if ckpt.parent.parent.resolve() != run_dir.resolve():  # a checkpoint of another run: a fork
        seed_metrics(ckpt.parent.parent / "metrics.jsonl", run_dir / "metrics.jsonl", state.step)
        state.run_id = None
    return state.step
