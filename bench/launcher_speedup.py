"""Wall time of one 4-job multirun of the embedded default (trainer.max_steps=20) on Hydra's basic
launcher (one job after another) and on the joblib launcher (n_jobs jobs at a time, one torch thread each).

    python bench/launcher_speedup.py [--jobs 2] [--out docs/launcher_speedup.md]

Prints a markdown table and writes it to --out: produces docs/launcher_speedup.md (with
--out docs/launcher_speedup.md; that doc's section on the mini study's sweep stage was measured separately,
with scripts/reproduce_mini.sh). Run it on an otherwise idle machine: it measures how well the machine's
cores are shared, so anything else running skews it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
def sweep(steps: int) -> list[str]:
    return ["seed=0,1,2,3", "logger=none", f"trainer.max_steps={steps}", "trainer.progress=false"]


def timed(launcher: list[str], sweep_dir: Path, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "trb_exp.train", "-m", *launcher, *sweep(steps), f"hydra.sweep.dir={sweep_dir}"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: the {launcher or 'basic'} multirun failed:\n{r.stderr[-2000:]}")
    done = len(list(sweep_dir.glob("*/summary.json")))
    if done != 4:
        raise SystemExit(f"error: {done} of 4 runs finished under {sweep_dir}")
    return wall


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--steps", type=int, nargs="+", default=[20], help="trainer.max_steps of the jobs (one row pair each)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    lines = ["| steps per job | basic launcher (s) | joblib, n_jobs=%d (s) | ratio |" % a.jobs, "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for steps in a.steps:
            basic = timed([], Path(tmp) / f"basic{steps}", steps)
            joblib = timed(["hydra/launcher=joblib", f"hydra.launcher.n_jobs={a.jobs}"], Path(tmp) / f"joblib{steps}", steps)
            lines.append(f"| {steps} | {basic:.1f} | {joblib:.1f} | {joblib / basic:.2f} |")
    lines += ["", f"4 jobs of `python -m trb_exp.train -m {' '.join(sweep(0)).replace('max_steps=0', 'max_steps=<steps>')}` "
              f"(the embedded default, one torch thread per job), first on Hydra's basic launcher (one job after another), "
              f"then on the joblib launcher. Machine: {os.cpu_count()} cores, {platform.machine()}, load average "
              f"{load0:.2f} before the runs. Command: `python bench/launcher_speedup.py --jobs {a.jobs} --steps "
              f"{' '.join(map(str, a.steps))}`.", ""]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text("# Parallel sweeps: joblib against the basic launcher\n\n" + text)


if __name__ == "__main__":
    main()
