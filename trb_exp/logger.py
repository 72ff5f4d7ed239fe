"""Run logging: always ``metrics.jsonl`` (one strict-JSON object per logged step) in the run dir, plus
Weights & Biases unless ``logger=none``. With no API key configured W&B runs offline, so a fresh
machine never fails; ``wandb sync`` uploads later.

A resumed run (``resume_step=k``) first cuts ``metrics.jsonl`` back to the rows of steps <= k, so no
step is logged twice or lost, and continues the same W&B run (``run_id``). A value that is not a
finite number (NaN, +-inf) is written as ``null`` with a warning, so every line stays valid JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a torn last line (a process killed mid-write) is skipped."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def cut_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps <= ``step`` (atomically: a new file renamed over the old one)."""
    path = Path(path)
    keep = [r for r in read_rows(path) if isinstance(r, dict) and r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))
    os.replace(tmp, path)


class RunLogger:
    def __init__(self, run_dir: Path, *, backend: str = "wandb", project: str = "trb_exp",
                 name: str | None = None, mode: str = "auto", config: dict | None = None,
                 run_id: str | None = None, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            cut_metrics(self.path, resume_step)
        self._file = self.path.open("a")
        self._warned: set[str] = set()
        self.wandb = None
        self.run_id = run_id
        if backend == "wandb":
            import wandb

            if mode == "auto":
                has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
                mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
            kw = {"id": run_id, "resume": "allow"} if run_id else {}
            self.wandb = wandb.init(project=project, name=name, mode=mode, dir=str(run_dir),
                                    config=config, reinit="finish_previous", **kw)
            self.run_id = getattr(self.wandb, "id", None) or run_id
        elif backend != "none":
            raise ValueError(f"logger.backend={backend!r}: use wandb or none")

    def _clean(self, k: str, v):
        if isinstance(v, float):
            if not math.isfinite(v):
                if k not in self._warned:
                    self._warned.add(k)
                    print(f"[warning] {k}={v} is not a finite number; metrics.jsonl records null", file=sys.stderr)
                return None
            return round(v, 6)
        return v

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: self._clean(k, v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    """The logger of ranks > 0 under torchrun: rank 0 alone writes metrics.jsonl and W&B."""

    run_id = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass
