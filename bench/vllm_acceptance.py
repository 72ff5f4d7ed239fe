"""rollout.engine=vllm against rollout.engine=static on pair a32 (model=embedded_a32), TRB, 50 steps, pass@1 every 10.
Produces docs/vllm.md's acceptance table (printed here; pasted into "What ran here" by hand).

    python bench/vllm_acceptance.py --out outputs/vllm_acceptance            # the 4 runs (seeds 0, 1), then the table
    python bench/vllm_acceptance.py --out outputs/vllm_acceptance --table    # the table of runs already there

Needs vllm (CPU: docs/vllm.md "Installing"). Every run: ``python -m trb_exp.train method=trb model=embedded_a32
rollout.engine=ENGINE seed=SEED logger=none trainer.max_steps=50 trainer.eval_every=10``. The table: pass@1 at
steps 0, 10, ..., 50 (its sampling standard error at step 50), the training seconds, and the medians over steps
6-50 of the step time and, for vLLM, its split (decode, the pair's teacher pass, the weight sync).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def train(run_dir: Path, engine: str, seed: int) -> None:
    if (run_dir / "summary.json").exists():
        return
    args = ["method=trb", "model=embedded_a32", f"rollout.engine={engine}", f"seed={seed}", "logger=none",
            "trainer.max_steps=50", "trainer.eval_every=10", "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    with open(run_dir.with_suffix(".log"), "w") as log:
        subprocess.run([sys.executable, "-m", "trb_exp.train", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=True)


def row(run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if "eval/pass@1" in r]
    tr = [r for r in rows if "train/loss" in r][5:]

    def med(key):
        return f"{statistics.median(r[key] for r in tr):.2f}" if tr and key in tr[0] else "–"

    train_s = json.loads((run_dir / "summary.json").read_text())["train_s"]
    curve = " ".join(f"{r['eval/pass@1']:.3f}" for r in ev)
    return (f"| {run_dir.name} | {curve} | {ev[-1]['eval/pass@1_se']:.3f} | {train_s:.0f} | {med('time/step_s')} | "
            f"{med('rollout/decode_s')} | {med('time/teacher_pass_s')} | {med('time/weight_sync_s')} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--table", action="store_true", help="only print the table of the runs in --out")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    runs = [a.out / f"trb_{engine}_s{seed}" for seed in a.seeds for engine in ("vllm", "static")]
    if not a.table:
        for run_dir in runs:
            train(run_dir, run_dir.name.split("_")[1], int(run_dir.name.rsplit("s", 1)[1]))
    print("| run | pass@1 at steps 0, 10, ..., 50 | se (50) | train s | step s | decode s | teacher pass s | sync s |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in runs:
        if (run_dir / "summary.json").exists():
            print(row(run_dir))


if __name__ == "__main__":
    main()
