"""Run directories that never mix two runs.

- ``${run_uid:}`` (an OmegaConf resolver, used by the default ``hydra.run.dir``) is this process's id
  plus 16 random bits: two runs started in the same second get different directories.
- ``RunDir`` claims a directory for one process (an ``flock`` on the directory itself: no file is
  added, and the kernel releases it even on ``kill -9``), knows what it held before this run, writes ``.hydra/`` only once the
  run is accepted (``hydra.output_subdir`` is null: Hydra itself writes nothing there), and removes
  what a rejected run created, so no empty directory is left behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from trb_exp.config import ConfigError


class FinishedRun(ConfigError):
    """The run dir holds a finished run: one line for a single run; a re-submitted sweep skips the job."""


_UID = f"{os.getpid()}{secrets.token_hex(2)}"
if not OmegaConf.has_resolver("run_uid"):
    OmegaConf.register_new_resolver("run_uid", lambda: _UID)

def _first_missing(argv: list[str]) -> Path | None:
    """The outermost directory of ``hydra.run.dir=...`` (on this command line) that does not exist yet:
    Hydra creates it with the run dir, so a rejected run removes it again."""
    for a in argv:
        if a.startswith("hydra.run.dir="):
            p = Path(a.split("=", 1)[1]).expanduser().absolute()
            missing = None
            while not p.exists():
                missing, p = p, p.parent
            return missing
    return None


CREATED_ROOT = _first_missing(sys.argv[1:])  # read at import, before Hydra creates anything

HYDRA_LOG_NAMES = ("train.log", "evaluate.log")  # Hydra's job log (empty: nothing logs through logging)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = None
        self.prior: list[str] = []

    def __enter__(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        self.prior = sorted(p.name for p in self.path.iterdir()
                            if not (p.name in HYDRA_LOG_NAMES and p.stat().st_size == 0))
        self._lock = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # a file system without flock: no lock
                return self
            self.release()
            raise ConfigError(f"run dir {self.path} is in use by another run that is still going; "
                              "give this one its own hydra.run.dir") from None
        return self

    @property
    def was_new(self) -> bool:
        return not self.prior

    def write_hydra(self, task_cfg, overwrite: bool = True) -> None:
        """``.hydra/{config,hydra,overrides}.yaml`` as Hydra writes them (``hydra.output_subdir`` is null,
        so Hydra writes nothing before the run is accepted)."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import _save_config

        out = self.path / ".hydra"
        if out.is_dir() and not overwrite:
            return
        hc = HydraConfig.instance().cfg
        _save_config(task_cfg, "config.yaml", out)
        _save_config(hc, "hydra.yaml", out)
        _save_config(hc.hydra.overrides.task, "overrides.yaml", out)

    def reject(self) -> None:
        """Undo what this run created: a directory that was new goes, with the parents Hydra created for
        it (those of a ``hydra.run.dir=`` that did not exist; else empty ones below the working
        directory); an existing one is left as it was."""
        self.release()
        if not self.was_new:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        top = CREATED_ROOT.resolve() if CREATED_ROOT is not None else None
        cwd, p = Path.cwd().resolve(), self.path.resolve().parent
        while top is not None and (p == top or top in p.parents) or (top is None and p != cwd and cwd in p.parents):
            try:
                p.rmdir()  # only an empty directory
            except OSError:
                break
            p = p.parent

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None

    def __exit__(self, *exc) -> None:
        self.release()


def discard_new(path) -> None:
    """A run stopped during start-up: its run directory goes if Hydra created it for this run (it holds
    nothing but Hydra's empty log), with the parents created for it; anything else is left as it was."""
    if path is None or not Path(path).is_dir():
        return
    try:
        with RunDir(Path(path)) as rd:
            rd.reject()
    except ConfigError:  # held by another run that is still going: not ours
        pass
