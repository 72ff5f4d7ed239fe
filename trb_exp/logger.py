"""Run logging: always ``metrics.jsonl`` (one JSON object per logged step) in the run dir, plus
Weights & Biases unless ``logger=none``. With no API key configured W&B runs offline, so a fresh
machine never fails; ``wandb sync`` uploads later."""

from __future__ import annotations

import json
import os
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: Path, *, backend: str = "wandb", project: str = "trb_exp",
                 name: str | None = None, mode: str = "auto", config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self.wandb = None
        if backend == "wandb":
            import wandb

            if mode == "auto":
                has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
                mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
            self.wandb = wandb.init(project=project, name=name, mode=mode, dir=str(run_dir),
                                    config=config, reinit="finish_previous")
        elif backend != "none":
            raise ValueError(f"logger.backend={backend!r}: use wandb or none")

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
