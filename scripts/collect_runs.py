"""Keep the record of finished runs (metrics.jsonl, summary.json, .hydra/{config,overrides}.yaml) of SRC,
without checkpoints: what ``python -m trb_exp.compare`` needs.

    python scripts/collect_runs.py outputs/study/mini_a docs/results/mini/mini_a/runs.jsonl.gz
    python scripts/collect_runs.py outputs/study/mini_a some/dir

A DST ending in ``.jsonl.gz`` is a data file (``trb_exp.analysis.runstore``): SRC's finished runs are added
to the runs it already holds (a run of the same name is replaced), named by their paths relative to SRC.
Any other DST is a directory: the four files are copied, keeping the relative layout. SRC is a directory
of runs or a data file.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from trb_exp.analysis import runstore

FILES = ("metrics.jsonl", "summary.json", ".hydra/config.yaml", ".hydra/overrides.yaml")


def finished(src: Path) -> list[runstore.RunRecord]:
    """SRC's finished runs (summary.json present)."""
    records = runstore.load(src) if src.is_file() else runstore.read_root(src) if src.is_dir() else []
    records = [r for r in records if r.summary is not None]
    if not records:
        raise runstore.InputError(f"error: no finished run (summary.json + .hydra/config.yaml) in {src}")
    return records


def collect(src: Path, dst: Path) -> int:
    """Add SRC's finished runs to DST (a data file or a directory); the number of runs added."""
    records = finished(Path(src))
    if str(dst).endswith(".jsonl.gz"):
        kept = [r for r in runstore.load(dst) if r.name not in {n.name for n in records}] if Path(dst).is_file() else []
        runstore.write(kept + records, Path(dst))
    elif Path(src).is_file():
        for rec in records:
            runstore.write_run_dir(rec, Path(dst))
    else:
        for rec in records:
            run = Path(src) / rec.name
            for name in FILES:
                if (run / name).is_file():
                    (dst / rec.name / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(run / name, dst / rec.name / name)
    return len(records)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(f"[collect] {collect(Path(sys.argv[1]), Path(sys.argv[2]))} runs -> {sys.argv[2]}")
