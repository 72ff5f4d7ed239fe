"""Copy the record of finished runs (metrics.jsonl, summary.json, .hydra/{config,overrides}.yaml) from
SRC to DST, keeping the relative layout: what ``python -m trb_exp.compare`` needs, without checkpoints.

    python scripts/collect_runs.py outputs/study/mini_a docs/results/mini/mini_a/runs
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

FILES = ("metrics.jsonl", "summary.json", ".hydra/config.yaml", ".hydra/overrides.yaml")


def collect(src: Path, dst: Path) -> int:
    runs = sorted(p.parent for p in src.rglob("summary.json") if (p.parent / ".hydra" / "config.yaml").is_file())
    if not runs:
        raise SystemExit(f"error: no finished run (summary.json + .hydra/config.yaml) under {src}")
    for run in runs:
        for name in FILES:
            if (run / name).is_file():
                (dst / run.relative_to(src) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run / name, dst / run.relative_to(src) / name)
    return len(runs)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(f"[collect] {collect(Path(sys.argv[1]), Path(sys.argv[2]))} runs -> {sys.argv[2]}")
