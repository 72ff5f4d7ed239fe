"""``TrainState``: everything a training run changes, with ``state_dict()`` / ``load_state_dict()``, and
its checkpoints on disk.

A state is the step counter (optimizer steps done), the student, the AdamW optimizer, the LR
schedule, every RNG stream (python ``random``, torch's CPU generator, CUDA's when present, and the
sampling ``torch.Generator`` that rollouts draw from), the W&B run id, the evaluation history, and
``extras``: any further object with ``state_dict()`` / ``load_state_dict()`` (a budget controller,
say) stored under its name. Restoring a state and running step k gives exactly what the
uninterrupted run gave at step k, because nothing else in a run carries over between steps
(``data.prompt_batch`` is a pure function of (seed, step), methods are functions of the step).

A checkpoint is a directory ``<run_dir>/checkpoints/step_<k>/``::

    student/      the student (safetensors, ``save_pretrained``) and its tokenizer: ``trb_exp.evaluate``
                  and ``from_pretrained`` read it as they read a finished run's ``student/``
    state.pt      the rest of the state (``torch.save`` of plain tensors, numbers, strings, lists and
                  dicts, loaded with ``torch.load(weights_only=True)``)
    checksums.json  the size and SHA-256 of every other file, written last, before the rename

It is written under a temporary name and renamed into place, so a crash mid-write never leaves a
directory that looks like a checkpoint. ``verify_checkpoint`` checks a checkpoint against its
``checksums.json`` (a disk that lost or garbled part of a file after the rename): ``resume.py`` skips a
damaged one for the next older intact one.

Under ``trainer.strategy=fsdp`` (FSDP2, several processes) a checkpoint holds sharded states instead of
``student/``::

    sharded/      the student's and the optimizer's shards, one file per rank and a ``.metadata``
                  (``torch.distributed.checkpoint``, ``get_state_dict`` / ``set_state_dict``)
    state.pt      the rest, as above, without the optimizer (rank 0 writes it; every rank's sampling
                  stream is in its ``meta.rng_ranks``)

Every rank writes its shard into the one temporary directory; after a barrier rank 0 renames it into
place. Such a checkpoint is for resuming; the finished run's ``student/`` is one consolidated model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from trb_exp.config import ConfigError
from trb_exp.optim import adamw_from_config

STATE_FILE = "state.pt"
CHECKSUMS_FILE = "checksums.json"
SHARDED_DIR = "sharded"
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


def rng_state(generator: torch.Generator) -> dict:
    version, internal, gauss = random.getstate()
    out = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
           "sampling": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampling"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # the sampling stream of rollouts (and SKD's replacements, the warm start)
    step: int = 0  # optimizer steps done; the next step to run
    run_id: str | None = None  # the W&B run id (resumes the same W&B run)
    history: list[dict] = field(default_factory=list)  # evaluation rows {"step": k, "eval/...": ...}
    train_s: float = 0.0  # wall seconds spent training (warm start + steps), summed over resumed segments
    extras: dict[str, Stateful] = field(default_factory=dict)  # more stateful objects, saved by name

    @classmethod
    def create(cls, student, cfg, device) -> "TrainState":
        opt, sched = adamw_from_config(student.parameters(), cfg.optim)
        gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
        return cls(student=student, optimizer=opt, lr_schedule=sched, generator=gen)

    def state_dict(self, *, student: bool = True, optimizer: bool = True) -> dict:
        out = {"format": FORMAT, "step": self.step, "lr_schedule": self.lr_schedule.state_dict(),
               "rng": rng_state(self.generator), "run_id": self.run_id, "history": [dict(h) for h in self.history],
               "train_s": float(self.train_s), "extras": {k: v.state_dict() for k, v in self.extras.items()}}
        if optimizer:
            out = {"format": FORMAT, "step": self.step, "optimizer": self.optimizer.state_dict(), **out}
        if student:
            out["student"] = self.student.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != FORMAT:
            raise ConfigError(f"checkpoint format {state.get('format')!r}: this version reads format {FORMAT}")
        if "student" in state:
            self.student.load_state_dict(state["student"])
        if "optimizer" in state:  # a sharded checkpoint restores it through torch.distributed.checkpoint
            self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        set_rng_state(state["rng"], self.generator)
        self.step = int(state["step"])
        self.run_id = state.get("run_id")
        self.history = [dict(h) for h in state.get("history", [])]
        self.train_s = float(state.get("train_s", 0.0))
        missing = set(self.extras) - set(state.get("extras", {}))
        if missing:
            raise ConfigError(f"the checkpoint has no state for {sorted(missing)}; it was written by another setup")
        for k, v in self.extras.items():
            v.load_state_dict(state["extras"][k])


# --------------------------------------------------------------------------- checkpoints on disk
def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(state: TrainState, ckpt_root: Path, tokenizer=None, extra_meta: dict | None = None) -> Path:
    """Write ``ckpt_root/step_<state.step>/`` atomically (temporary directory, then rename) and return it."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{state.step}"
    tmp = ckpt_root / f".tmp-step_{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state.student.save_pretrained(tmp / "student")  # safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "student")
    payload = state.state_dict(student=False)
    if extra_meta:
        payload["meta"] = extra_meta
    payload["checksummed"] = True  # a checkpoint that lost its checksums.json is damaged, not an old one
    torch.save(payload, tmp / STATE_FILE)
    write_checksums(tmp)
    _publish(tmp, final)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete temporary checkpoint ``tmp`` into place as ``final`` (fsynced first)."""
    _fsync_tree(tmp)
    if final.exists():  # the same step written again (a resumed run's re-checkpoint): replace it
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(ckpt: Path) -> None:
    """``ckpt/checksums.json``: {relative path: {"bytes": n, "sha256": hex}} of every other file of ``ckpt``."""
    files = sorted(p for p in Path(ckpt).rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)
    table = {p.relative_to(ckpt).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (Path(ckpt) / CHECKSUMS_FILE).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def verify_checkpoint(ckpt: Path) -> tuple[Path, str] | None:
    """None if checkpoint ``ckpt`` is intact, else (the damaged file, what is wrong with it). A checkpoint
    with ``checksums.json`` is checked against it (every listed file there, same size, same SHA-256); one
    written before checksums (no such file, and a ``state.pt`` that does not say it has them) is checked by
    loading ``state.pt`` and reading the headers of its safetensors files."""
    ckpt = Path(ckpt)
    sums = ckpt / CHECKSUMS_FILE
    if not sums.is_file():
        return _verify_by_loading(ckpt)
    try:
        table = json.loads(sums.read_text())
        assert isinstance(table, dict) and table and all(isinstance(v, dict) for v in table.values())
    except (OSError, ValueError, AssertionError):
        return sums, "not a valid checksum table (empty, truncated or garbled)"
    for rel, want in sorted(table.items()):
        f = ckpt / rel
        if not f.is_file():
            return f, "missing"
        size = f.stat().st_size
        if size != want.get("bytes"):
            return f, f"{size} bytes where {want.get('bytes')} were written (truncated or overwritten)"
        if _sha256(f) != want.get("sha256"):
            return f, "its SHA-256 differs from the one written with it (the file is damaged)"
    return None


def _verify_by_loading(ckpt: Path) -> tuple[Path, str] | None:
    """A checkpoint without ``checksums.json``: its files must load."""
    from safetensors import safe_open

    try:
        payload = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a damaged pickle raises anything from EOFError to RuntimeError
        return ckpt / STATE_FILE, f"does not load ({_first_line(e)})"
    if isinstance(payload, dict) and payload.get("checksummed"):
        return ckpt / CHECKSUMS_FILE, "missing (this checkpoint was written with one)"
    for f in sorted((ckpt / "student").glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    st.get_slice(k)
        except Exception as e:  # noqa: BLE001 -- SafetensorError and OSError alike
            return f, f"does not load ({_first_line(e)})"
    return None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def sharded(path: Path) -> bool:
    """Whether checkpoint ``path`` holds FSDP2 shards (``save_sharded_checkpoint``)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def save_sharded_checkpoint(state: TrainState, model, ckpt_root: Path, ctx, extra_meta: dict | None = None) -> Path:
    """FSDP2 (every rank calls it): ``ckpt_root/step_<state.step>/`` with the student's and the optimizer's
    shards written by every rank through ``torch.distributed.checkpoint`` and the rest of the state
    (``state.pt``) by rank 0, all in one temporary directory that rank 0 renames into place once every rank
    is done (a barrier). ``ctx``: the ``distributed.DistContext``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{state.step}"
    tmp = ckpt_root / f".tmp-step_{state.step}-{os.getpid()}"
    if ctx.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    tmp = Path(ctx.broadcast(str(tmp)))  # rank 0's name, created before any rank writes
    model_sd, optim_sd = get_state_dict(model, state.optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDED_DIR))
    if ctx.is_main:
        payload = state.state_dict(student=False, optimizer=False)
        if extra_meta:
            payload["meta"] = extra_meta
        payload["checksummed"] = True
        torch.save(payload, tmp / STATE_FILE)
    ctx.barrier()  # every rank's shard is on disk
    if ctx.is_main:
        write_checksums(tmp)
        _publish(tmp, final)
    ctx.barrier()  # nobody goes on (or prunes) before the checkpoint is in place
    return final


def load_sharded_checkpoint(state: TrainState, model, path: Path) -> dict:
    """Restore ``state`` from a sharded checkpoint (every rank calls it; ``model``: the FSDP2 student the
    optimizer was built on); returns the payload of ``state.pt``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    payload = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    model_sd, optim_sd = get_state_dict(model, state.optimizer)
    both = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(both, checkpoint_id=str(path / SHARDED_DIR))
    set_state_dict(model, state.optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    state.load_state_dict(payload)
    return payload


def save_consolidated(model, weights: dict, path: Path) -> None:
    """The FSDP2 student as one ordinary Hugging Face model (safetensors, ``from_pretrained`` loads it):
    ``weights``, its full state dict gathered on rank 0 (``distributed.full_state_dict``), through
    ``save_pretrained``, under the model's own class name (not FSDP2's wrapper class)."""
    import json

    path = Path(path)
    kept = dict(model.named_parameters())  # a tied parameter once, under its first name (as save_pretrained does)
    tied = {k for k, p in model.named_parameters(remove_duplicate=False) if k not in kept}
    model.save_pretrained(path, state_dict={k: v for k, v in weights.items() if k not in tied})
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("architectures"):
        cfg["architectures"] = [a.removeprefix("FSDP") for a in cfg["architectures"]]
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_checkpoint(state: TrainState, path: Path) -> dict:
    """Restore ``state`` (student weights included) from checkpoint directory ``path``; returns its payload."""
    from safetensors.torch import load_file

    path = Path(path)
    payload = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    files = sorted((path / "student").glob("*.safetensors"))
    if not files:
        raise ConfigError(f"trainer.resume: {path} has no student/*.safetensors; not a checkpoint of this trainer")
    weights = {}
    for f in files:
        weights.update(load_file(f, device="cpu"))
    missing, unexpected = state.student.load_state_dict(weights, strict=False)
    tied = {k for k in missing if _is_tied(state.student, k)}
    if unexpected or set(missing) - tied:
        raise ConfigError(f"trainer.resume: {path} does not hold this student (missing "
                          f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    state.load_state_dict(payload)
    return payload


def _is_tied(model, key: str) -> bool:
    """Whether parameter ``key`` shares its storage with another parameter (tied embeddings are saved once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    return p is not None and any(q is p and k != key for k, q in params.items())


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """The published checkpoints under ``ckpt_root`` (intact or not: ``verify_checkpoint``), oldest first."""
    if not Path(ckpt_root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(ckpt_root).iterdir()
             if (m := _STEP_DIR.match(p.name)) and ((p / STATE_FILE).is_file() or (p / CHECKSUMS_FILE).is_file())]
    return [p for _, p in sorted(found)]


def prune_checkpoints(ckpt_root: Path, keep: int | None) -> None:
    """Keep the newest ``keep`` checkpoints (None or 0: all); drop leftovers of interrupted writes."""
    for p in Path(ckpt_root).glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)
    if keep:
        for p in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else -1
