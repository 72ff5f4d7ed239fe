"""The powered study (docs/results/powered/PLAN.md): OPD, TRB and three other arms on the two miniature
settings, paired by seed, seeds added in order until the stopping rule says enough.

    python scripts/powered_study.py run [--out outputs/powered] [--lanes 2] [--max-seeds N]
        runs the next seeds the stopping rule asks for (finished runs are skipped, so it resumes);
    python scripts/powered_study.py status [ROOT]
        per setting: completed seeds, the primary paired difference TRB - OPD and its CI half-width;
    python scripts/powered_study.py report [--runs docs/results/powered/runs] [--out docs/results/powered]
        the report (report.md, curves.png, differences.png) from finished runs.

Every run is ``python -m trb_exp.train experiment=<setting> <arm overrides> seed=<s> logger=none`` with one
torch thread, written to ``<out>/<setting>/<arm>/seed_<s>/``. The primary metric is the area under the
pass@1 curve (trapezoid over the evaluated steps, divided by the steps spanned: the run's mean pass@1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trb_exp.compare import mean_ci, paired_difference  # noqa: E402

# ---- the pre-registered design (PLAN.md); change nothing here once runs exist --------------------
SETTINGS = ("mini_a", "mini_b")
ARMS = {  # arm -> command-line overrides (method.name labels the arm in every report)
    "opd": ["method=opd"],
    "trb": ["method=trb", "schedule=linear", "schedule.eps0=0.5", "schedule.warmup_steps=50"],
    "sft_warmup": ["method=sft_warmup", "method.sft_updates=50"],
    "trb_gap": ["method=trb", "method.name=trb_gap", "schedule=gap", "schedule.eps0=0.5", "schedule.handover=0.5"],
    "trb_reward": ["method=trb", "method.name=trb_reward", "schedule=reward", "schedule.eps0=0.5",
                   "schedule.target_reward=0.25"],
}
FIRST_SEED, MAX_SEEDS, MIN_SEEDS = 100, 20, 5
HALF_WIDTH = 0.05  # stop a setting once the 95% CI half-width of TRB - OPD (primary metric) is <= this
TARGET = 0.3       # secondary metric: first evaluated step with pass@1 >= 0.3


# ---- metrics -------------------------------------------------------------------------------
def auc(evals: dict[int, float]) -> float:
    """Mean pass@1 over training: the trapezoid area under the (step, pass@1) curve / steps spanned."""
    steps = sorted(evals)
    if len(steps) < 2:
        raise ValueError(f"auc needs >= 2 evaluated steps, got {steps}")
    area = sum((evals[a] + evals[b]) / 2 * (b - a) for a, b in zip(steps, steps[1:]))
    return area / (steps[-1] - steps[0])


def steps_to(evals: dict[int, float], target: float = TARGET) -> int | None:
    return next((s for s in sorted(evals) if evals[s] >= target - 1e-9), None)


def load_evals(run_dir: Path) -> dict[int, float] | None:
    """step -> eval/pass@1 of a finished run (summary.json present), else None."""
    import json

    if not (run_dir / "summary.json").is_file():
        return None
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/pass@1" in row:
            out[int(row["step"])] = float(row["eval/pass@1"])
    return out


def collect(root: Path) -> dict[str, dict[str, dict[int, dict[int, float]]]]:
    """setting -> arm -> seed -> evals, for every finished run under root."""
    out: dict = {s: {a: {} for a in ARMS} for s in SETTINGS}
    for s in SETTINGS:
        for a in ARMS:
            for d in sorted((root / s / a).glob("seed_*")):
                ev = load_evals(d)
                if ev is not None:
                    out[s][a][int(d.name.split("_")[1])] = ev
    return out


def complete_seeds(runs: dict, setting: str) -> list[int]:
    """Seeds with every arm finished, in order, up to the first gap (the study adds seeds in order)."""
    done, seed = [], FIRST_SEED
    while all(seed in runs[setting][a] for a in ARMS):
        done.append(seed)
        seed += 1
    return done


def primary_difference(runs: dict, setting: str, arm: str = "trb", seeds=None) -> dict:
    seeds = complete_seeds(runs, setting) if seeds is None else seeds
    a = {s: auc(runs[setting][arm][s]) for s in seeds}
    b = {s: auc(runs[setting]["opd"][s]) for s in seeds}
    return paired_difference(a, b)


def stopped(runs: dict, setting: str) -> tuple[bool, str]:
    """The stopping rule, evaluated on the completed seeds only."""
    n = len(complete_seeds(runs, setting))
    if n >= MAX_SEEDS:
        return True, f"{n} seeds: the cap"
    if n >= MIN_SEEDS:
        d = primary_difference(runs, setting)
        if d["half"] is not None and d["half"] <= HALF_WIDTH:
            return True, f"{n} seeds: half-width {d['half']:.4f} <= {HALF_WIDTH}"
    return False, f"{n} seeds"


# ---- running -------------------------------------------------------------------------------
def run_dir(out: Path, setting: str, arm: str, seed: int) -> Path:
    return out / setting / arm / f"seed_{seed}"


def command(out: Path, setting: str, arm: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "trb_exp.train", f"experiment={setting}", *ARMS[arm], f"seed={seed}",
            "logger=none", "threads=1", f"hydra.run.dir={run_dir(out, setting, arm, seed)}"]


def run_jobs(jobs: list[tuple[str, str, int]], out: Path, lanes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    pending, active = list(jobs), []
    while pending or active:
        while pending and len(active) < lanes:
            s, a, seed = pending.pop(0)
            d = run_dir(out, s, a, seed)
            if d.exists():  # an interrupted run (no summary.json): start it again from scratch
                shutil.rmtree(d)
            d.parent.mkdir(parents=True, exist_ok=True)
            log = open(d.parent / f"seed_{seed}.log", "w")
            p = subprocess.Popen(["nice", "-n", "10", *command(out, s, a, seed)], cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
            active.append((p, log, (s, a, seed), time.time()))
            print(f"[start] {s} {a} seed {seed}", flush=True)
        time.sleep(2)
        for item in list(active):
            p, log, job, t0 = item
            if p.poll() is not None:
                log.close()
                active.remove(item)
                print(f"[{'done' if p.returncode == 0 else 'FAILED rc=%d' % p.returncode}] {' '.join(map(str, job))} "
                      f"in {time.time() - t0:.0f} s", flush=True)


def cmd_run(args) -> None:
    out = Path(args.out)
    for _ in range(args.max_seeds):
        runs = collect(out)
        jobs = []
        for s in SETTINGS:
            stop, why = stopped(runs, s)
            print(f"[rule] {s}: {why}{' -> stopped' if stop else ''}", flush=True)
            if stop:
                continue
            seed = FIRST_SEED + len(complete_seeds(runs, s))
            jobs += [(s, a, seed) for a in ARMS if seed not in runs[s][a]]
        if not jobs:
            print("[study] every setting has stopped", flush=True)
            return
        run_jobs(jobs, out, args.lanes)


def cmd_status(args) -> None:
    runs = collect(Path(args.root))
    for s in SETTINGS:
        d = primary_difference(runs, s) if complete_seeds(runs, s) else {"n": 0}
        stop, why = stopped(runs, s)
        line = f"{s}: {why}"
        if d["n"]:
            line += f"; AUC TRB - OPD {d['mean']:+.4f}" + (f" ± {d['half']:.4f}" if d["half"] is not None else "")
        print(line + (" (stopped)" if stop else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="outputs/powered")
    r.add_argument("--lanes", type=int, default=2)
    r.add_argument("--max-seeds", type=int, default=MAX_SEEDS, help="seed rounds to run now (the study resumes)")
    st = sub.add_parser("status")
    st.add_argument("root", nargs="?", default="docs/results/powered/runs")
    args = p.parse_args(argv)
    {"run": cmd_run, "status": cmd_status}[args.cmd](args)


if __name__ == "__main__":
    main()
