"""The generalisation study (docs/results/generalisation/PLAN.md): OPD against TRB on five settings, a
budget-matched control for the reward controller, and TRB at the configuration the validation split selects.

    python scripts/generalisation_study.py matched
        the budget-matched linear schedule (eps0, K) per setting, derived from the committed powered-study
        trb_reward runs (docs/results/powered/runs), with every per-run number it uses;
    python scripts/generalisation_study.py run --out /work/study_runs/generalisation [--lanes 2] [--pairs-from DIR]
                                                [--code /work/wt-study-runs]
        runs what the plan asks for, in the plan's order, two lanes under ``nice -n 19``, one torch thread each,
        with the code (and its .venv) of the checkout --code (default: this one), whose commit the runs record;
        finished runs (summary.json) in --out, committed under --committed or reused from the powered study are
        never run again. An interrupted run resumes from its newest checkpoint (every 50 steps, or where a
        SIGTERM stopped it: bit-identical to an uninterrupted run, tests/test_checkpoint_resume.py); one without
        a checkpoint starts again from scratch. SIGTERM to the runner stops its runs with a checkpoint (exit 75)
        and then the runner: ``kill -TERM $(cat <out>/runner.pid)``. A setting whose pair is not built yet waits:
        --pairs-from DIR copies DIR/embedded_<p> (key-checked) into <out>/pairs, the TRB_EXP_CACHE of the runs;
        nothing is ever built by a run;
    python scripts/generalisation_study.py status [--out DIR]
        per block: finished / planned runs;
    python scripts/generalisation_study.py report [--runs docs/results/generalisation/runs] [--out docs/results/generalisation]
        the report (README.md and its plots) from finished runs.

Every run is ``python -m trb_exp.train experiment=<setting> <arm overrides> seed=<s> logger=none threads=1``
written to ``<out>/<setting>/<arm>/seed_<s>/`` (the selection grid: ``<out>/selection/<setting>/eps0_<e>_K_<k>/
seed_<s>/``). The metric is the powered study's AUC: the trapezoid area under the pass@1 curve over the
evaluated steps, divided by the steps spanned (the run's mean pass@1 over training).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ---- the pre-registered design (PLAN.md); change nothing here once runs exist --------------------
SETTINGS = ("mini_a", "mini_b", "mini_c", "mini_d", "mini_e")
PAIR = {"mini_a": "a", "mini_b": "b", "mini_c": "c", "mini_d": "d", "mini_e": "e"}
SEEDS = tuple(range(100, 110))  # every arm and setting, paired by seed
FROZEN = {"eps0": 0.5, "K": 50}  # the powered study's TRB arm (selected on mini_a's test set, seed 0)
GRID_EPS0 = (0.1, 0.25, 0.5, 1.0, 2.0)  # conf/sweep/trb_mini.yaml: the paper's K, eps0 rescaled to the tiny pairs
GRID_K = (15, 25, 50)
SELECTION_SETTING, SELECTION_SEEDS = "mini_a", (200, 201, 202)
MATCHED_SEEDS = {"mini_a": tuple(range(100, 110)), "mini_b": tuple(range(100, 106))}  # the powered study's 16
MAIN_ARMS = ("opd", "trb", "trb_sel")
REUSED_ARMS = ("opd", "trb")  # identical configuration in the powered study: its committed runs are used


def unpacked(data: Path) -> Path:
    """The runs of a committed data file (``runs.jsonl.gz``, trb_exp.analysis.runstore) as run directories, which
    the runner and the analysis below read: unpacked once into $TRB_EXP_CACHE (default ~/.cache/trb_exp), keyed by
    the file's hash. A missing data file gives a path that holds no runs."""
    import hashlib

    from trb_exp.analysis import runstore

    if not data.is_file():
        return data.with_suffix("").with_suffix("")  # .../runs: no runs there
    key = hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    out = Path(os.environ.get("TRB_EXP_CACHE") or Path.home() / ".cache" / "trb_exp") / f"runs-{key}"
    if not out.is_dir():
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        runstore.unpack(data, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


POWERED = unpacked(ROOT / "docs" / "results" / "powered" / "runs.jsonl.gz")
COMMITTED_DATA = ROOT / "docs" / "results" / "generalisation" / "runs.jsonl.gz"  # this study's finished runs
COMMITTED = unpacked(COMMITTED_DATA)
TARGET = 0.3  # secondary: pass@1 >= 0.3 by the last step (250)
NO_VAL = ("dataset.val_size=0",)  # main and matched runs: their analysis reads the test split only (saves ~1/6 of
#                                   a run; the validation split changes no other value, tests/test_train.py)


def linear(eps0: float, k: int, name: str) -> list[str]:
    return ["method=trb", f"method.name={name}", "schedule=linear", f"schedule.eps0={eps0:g}", f"schedule.warmup_steps={k}"]


ARM_OVERRIDES = {"opd": ["method=opd"], "trb": linear(FROZEN["eps0"], FROZEN["K"], "trb")}


# ---- records -------------------------------------------------------------------------------------
class Record(NamedTuple):
    """A finished run: test and validation pass@1 per evaluated step, the logged budget per logged step,
    the cumulative training seconds at each evaluated step (sum of time/step_s), train_s, its environment."""

    evals: dict
    val: dict
    eps: dict
    wall: dict
    train_s: float
    env: dict | None


def load_record(run_dir: Path) -> Record | None:
    if not (run_dir / "summary.json").is_file():
        return None
    evals, val, eps, wall, t = {}, {}, {}, {0: 0.0}, 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        step = int(row["step"])
        if "train/loss" in row:
            t += float(row.get("time/step_s", 0.0))
            if "trb/eps" in row:
                eps[step] = float(row["trb/eps"])
        if "eval/pass@1" in row:
            evals[step] = float(row["eval/pass@1"])
            wall[step] = t
        if "val/pass@1" in row:
            val[step] = float(row["val/pass@1"])
    summary = json.loads((run_dir / "summary.json").read_text())
    return Record(evals, val, eps, {s: wall[s] for s in evals if s in wall}, float(summary.get("train_s", "nan")),
                  summary.get("env"))


from trb_exp.analysis.stats import curve_auc as auc  # noqa: E402  (the studies' one AUC)


def steps_to(evals: dict[int, float], target: float = TARGET) -> int | None:
    return next((s for s in sorted(evals) if evals[s] >= target - 1e-9), None)


def median(xs) -> float:
    return statistics.median(list(xs))


# ---- the budget-matched control --------------------------------------------------------------------
class Matched(NamedTuple):
    eps0: float
    K: int
    handover: list  # per run: the first training step with budget 0 (logged step - 1)
    spent: list  # per run: sum of trb/eps over the logged steps (nats x steps)
    mean_warm: list  # per run: mean budget over the steps before the hand-over


@functools.lru_cache(maxsize=None)  # committed runs: read once per process
def matched_schedule(setting: str, powered: Path = POWERED) -> Matched:
    """The linear schedule with the reward controller's measured hand-over and total budget on ``setting``:
    K = the median over runs of the hand-over step (rounded half up), eps0 = 2 S / (K + 1) with S the median
    of the runs' total budget sum_k eps_k, so that sum_k eps0 (1 - k/K) over k = 0..K-1 equals S."""
    handover, spent, warm = [], [], []
    for seed in MATCHED_SEEDS[setting]:
        rec = load_record(powered / setting / "trb_reward" / f"seed_{seed}")
        if rec is None:
            raise SystemExit(f"error: {powered / setting / 'trb_reward' / f'seed_{seed}'}: no finished run")
        steps = sorted(rec.eps)
        first_zero = next(s for s in steps if rec.eps[s] == 0)  # logged step k+1 is training step k
        handover.append(first_zero - 1)
        spent.append(round(sum(rec.eps.values()), 4))
        before = [rec.eps[s] for s in steps if s < first_zero]
        warm.append(round(sum(before) / len(before), 4))
    k = int(median(handover) + 0.5)
    return Matched(round(2 * median(spent) / (k + 1), 3), k, handover, spent, warm)


def cmd_matched(args) -> None:
    for s in MATCHED_SEEDS:
        m = matched_schedule(s, Path(args.powered))
        print(f"{s}: seeds {MATCHED_SEEDS[s][0]}-{MATCHED_SEEDS[s][-1]}: hand-over steps {m.handover} (median "
              f"{median(m.handover):g} -> K = {m.K}); total budget {m.spent} (median {median(m.spent):.4g}); "
              f"mean budget before the hand-over {m.mean_warm} (median {median(m.mean_warm):.4g}) "
              f"-> eps0 = 2 x {median(m.spent):.4g} / ({m.K} + 1) = {m.eps0}")


# ---- jobs --------------------------------------------------------------------------------------------
class Job(NamedTuple):
    block: str  # matched | selection | main
    setting: str
    arm: str
    seed: int
    overrides: tuple
    rel: str  # the run dir relative to --out (and to the committed runs)


def grid_rel(setting: str, eps0: float, k: int, seed: int) -> str:
    return f"selection/{setting}/eps0_{eps0:g}_K_{k}/seed_{seed}"


def selection_jobs() -> list[Job]:
    return [Job("selection", SELECTION_SETTING, f"eps0_{e:g}_K_{k}", seed, tuple(linear(e, k, "trb")),
                grid_rel(SELECTION_SETTING, e, k, seed))
            for seed in SELECTION_SEEDS for e in GRID_EPS0 for k in GRID_K]


def selected(find) -> tuple[float, int] | None:
    """The grid point with the highest validation AUC (val/pass@1), mean over the selection seeds; ties: the
    first in (eps0, K) order. None until every selection run has finished. ``find(rel)`` -> Record | None."""
    best = None
    for e in GRID_EPS0:
        for k in GRID_K:
            recs = [find(grid_rel(SELECTION_SETTING, e, k, s)) for s in SELECTION_SEEDS]
            if any(r is None for r in recs):
                return None
            score = sum(auc(r.val) for r in recs) / len(recs)
            if best is None or score > best[0]:
                best = (score, e, k)
    return best[1], best[2]


def matched_jobs() -> list[Job]:
    jobs, sched = [], {s: matched_schedule(s) for s in MATCHED_SEEDS}
    for seed in SEEDS:
        for s in MATCHED_SEEDS:
            if seed in MATCHED_SEEDS[s]:
                m = sched[s]
                jobs.append(Job("matched", s, "trb_matched", seed, (*linear(m.eps0, m.K, "trb_matched"), *NO_VAL),
                                f"{s}/trb_matched/seed_{seed}"))
    return jobs


def main_jobs(sel: tuple[float, int] | None) -> list[Job]:
    """Seed by seed, setting by setting, arm by arm. trb_sel waits for the selection; if it selects the frozen
    point, trb_sel IS the trb arm (not run twice)."""
    jobs = []
    for seed in SEEDS:
        for s in SETTINGS:
            for arm in MAIN_ARMS:
                if arm == "trb_sel":
                    if sel is None or sel == (FROZEN["eps0"], FROZEN["K"]):
                        continue
                    ov = linear(sel[0], sel[1], "trb_sel")
                else:
                    ov = ARM_OVERRIDES[arm]
                jobs.append(Job("main", s, arm, seed, (*ov, *NO_VAL), f"{s}/{arm}/seed_{seed}"))
    return jobs


def reused(job: Job) -> Path | None:
    """The powered study's committed run that this job would repeat (same setting, arm configuration, seed)."""
    if job.block == "main" and job.arm in REUSED_ARMS and (POWERED / job.rel / "summary.json").is_file():
        return POWERED / job.rel
    return None


# ---- running -------------------------------------------------------------------------------------
def pair_ready(pair: str, cache: Path, code: Path = ROOT) -> bool:
    """The pair is where the runs (the checkout ``code``) find it: shipped there or in the runs' cache."""
    from trb_exp.models import ASSETS, embedded_dir_of
    from trb_exp.prepare import pair_spec

    key = pair_spec(pair).key()
    shipped = code / embedded_dir_of(pair).relative_to(ASSETS.parent.parent)
    for d in (shipped, cache / f"embedded-{key}"):
        p = d / "prepare.json"
        if p.is_file() and json.loads(p.read_text()).get("key") == key:
            return True
    return False


def import_pairs(src: Path, cache: Path) -> None:
    """Copy built pairs DIR/embedded_<p> whose prepare.json key is the plan's into the runs' cache."""
    from trb_exp.prepare import pair_spec

    for s in SETTINGS:
        p = PAIR[s]
        d, key = src / f"embedded_{p}", pair_spec(p).key()
        dst = cache / f"embedded-{key}"
        if (d / "prepare.json").is_file() and not dst.exists():
            if json.loads((d / "prepare.json").read_text()).get("key") != key:
                print(f"[pairs] {d}: another spec (key != {key}); not used", flush=True)
                continue
            shutil.copytree(d, dst.with_suffix(".tmp"))
            dst.with_suffix(".tmp").rename(dst)
            print(f"[pairs] pair {p} -> {dst}", flush=True)


def command(out: Path, job: Job, python: str = sys.executable) -> list[str]:
    return [python, "-m", "trb_exp.train", f"experiment={job.setting}", *job.overrides, f"seed={job.seed}",
            "logger=none", "threads=1", f"hydra.run.dir={out / job.rel}"]


def finder(*roots: Path):
    done: dict = {}  # a finished run's record never changes: read once per runner

    def find(rel: str) -> Record | None:
        if rel in done:
            return done[rel]
        for r in roots:
            if (rec := load_record(r / rel)) is not None:
                done[rel] = rec
                return rec
        return None
    return find


def pending(out: Path, committed: Path, cache: Path, code: Path = ROOT, find=None) -> tuple[list[Job], list[str]]:
    """The plan's runs not finished anywhere, in order, whose prerequisites are met; and what waits."""
    find = find or finder(out, committed)
    sel = selected(find)
    waits = [] if sel is not None else ["trb_sel waits for the selection grid"]
    jobs = []
    for job in matched_jobs() + selection_jobs() + main_jobs(sel):
        if reused(job) is not None or find(job.rel) is not None:
            continue
        if not pair_ready(PAIR[job.setting], cache, code):
            waits.append(f"{job.setting} waits for pair {PAIR[job.setting]}")
            continue
        jobs.append(job)
    return jobs, sorted(set(waits))


def start(out: Path, job: Job, env: dict, code: Path, python: str):
    d = out / job.rel
    resumed = (d / "checkpoints").is_dir() and any((d / "checkpoints").glob("step_*"))
    if d.exists() and not resumed:  # interrupted before its first checkpoint: start it again from scratch
        shutil.rmtree(d)
    d.parent.mkdir(parents=True, exist_ok=True)
    log = open(d.parent / f"{d.name}.log", "a" if resumed else "w")
    p = subprocess.Popen(["nice", "-n", "19", *command(out, job, python)], cwd=code, env=env, stdout=log,
                         stderr=subprocess.STDOUT)
    print(f"[{'resume' if resumed else 'start'}] {job.rel}", flush=True)
    return p, log, job, time.time()


def _lock(out: Path) -> None:
    """One runner per output folder: <out>/runner.pid names the live one."""
    pidfile = out / "runner.pid"
    if pidfile.is_file():
        try:
            os.kill(int(pidfile.read_text().split()[0]), 0)
            raise SystemExit(f"error: {pidfile}: runner {pidfile.read_text().split()[0]} is running on this --out; "
                             "stop it first (kill -TERM) or wait for it")
        except (ProcessLookupError, ValueError):
            pass
    pidfile.write_text(f"{os.getpid()}\n")


def cmd_run(args) -> None:
    import signal

    out, committed = Path(args.out).resolve(), Path(args.committed).resolve()
    code = Path(args.code).resolve()
    python = str(code / ".venv" / "bin" / "python") if (code / ".venv" / "bin" / "python").is_file() else sys.executable
    cache = out / "pairs"
    cache.mkdir(parents=True, exist_ok=True)
    _lock(out)
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (out / "runner_commit.txt").write_text(commit + "\n")
    print(f"[study] runs use the code at {commit} ({code}, {python}); runs in {out}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(code), "TRB_EXP_CACHE": str(cache)}
    active, said, stopping, find = [], None, [], finder(out, committed)
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while True:
        if stopping:  # each run checkpoints its current step and exits 75; resumed by the next runner
            for p, log, job, _ in active:
                p.send_signal(signal.SIGTERM)
            for p, log, job, _ in active:
                p.wait()
                log.close()
                print(f"[stopped rc={p.returncode}] {job.rel}", flush=True)
            (out / "runner.pid").unlink(missing_ok=True)
            return
        if args.pairs_from:
            import_pairs(Path(args.pairs_from), cache)
        running = {a[2].rel for a in active}
        jobs, waits = pending(out, committed, cache, code, find)
        jobs = [j for j in jobs if j.rel not in running]
        if waits != said:
            print("[wait] " + ("; ".join(waits) or "nothing"), flush=True)
            said = waits
        while jobs and len(active) < args.lanes:
            active.append(start(out, jobs.pop(0), env, code, python))
        if not active and not jobs:
            if not waits or not args.wait:
                print("[study] nothing left to run now" + (f" ({'; '.join(waits)})" if waits else ""), flush=True)
                (out / "runner.pid").unlink(missing_ok=True)
                return
        time.sleep(10)
        for item in list(active):
            p, log, job, t0 = item
            if p.poll() is not None:
                log.close()
                active.remove(item)
                print(f"[{'done' if p.returncode == 0 else 'FAILED rc=%d' % p.returncode}] {job.rel} "
                      f"in {time.time() - t0:.0f} s", flush=True)


def cmd_status(args) -> None:
    out, committed = Path(args.out), Path(args.committed)
    find = finder(out, committed)
    sel = selected(find)
    for block, jobs in (("matched", matched_jobs()), ("selection", selection_jobs()), ("main", main_jobs(sel))):
        done = sum(1 for j in jobs if reused(j) is not None or find(j.rel) is not None)
        print(f"{block}: {done}/{len(jobs)} finished" + (f" (selected eps0={sel[0]:g}, K={sel[1]})" if block == "main" and sel else ""))



# ---- report --------------------------------------------------------------------------------------
ARM_ORDER = ("opd", "trb", "trb_sel", "trb_matched", "trb_reward")


def collect(roots) -> dict:
    """setting -> arm -> seed -> Record over the roots (first found wins), the powered study's reused arms
    included; and "selection" -> grid point -> seed -> Record."""
    out: dict = {s: {a: {} for a in ARM_ORDER} for s in SETTINGS}
    out["selection"] = {}
    for root in [*roots, POWERED]:
        for s in SETTINGS:
            arms = ARM_ORDER if root != POWERED else (*REUSED_ARMS, "trb_reward")
            for a in arms:
                for d in sorted(x for x in (root / s / a).glob("seed_*") if x.is_dir()):
                    seed = int(d.name.split("_")[1])
                    if root == POWERED and a in REUSED_ARMS and seed not in SEEDS:
                        continue
                    if seed not in out[s][a] and (rec := load_record(d)) is not None:
                        out[s][a][seed] = rec
        for d in sorted(x for x in (root / "selection" / SELECTION_SETTING).glob("eps0_*/seed_*") if x.is_dir()):
            cell = out["selection"].setdefault(d.parent.name, {})
            seed = int(d.name.split("_")[1])
            if seed not in cell and (rec := load_record(d)) is not None:
                cell[seed] = rec
    return out


def paired(runs: dict, setting: str, arm: str, base: str, metric) -> dict:
    """Per-seed differences arm - base of ``metric(record)`` over the seeds both finished."""
    from trb_exp.analysis.stats import paired_difference

    a, b = runs[setting][arm], runs[setting][base]
    return paired_difference({s: metric(a[s]) for s in a}, {s: metric(b[s]) for s in b})


def across(runs: dict, arm: str, base: str, settings=SETTINGS):
    """(per-setting paired AUC differences, the random-effects estimate over the settings with n >= 2, or None)."""
    from trb_exp.analysis.stats import random_effects

    per = {s: paired(runs, s, arm, base, lambda r: auc(r.evals)) for s in settings}
    use = {s: d for s, d in per.items() if d["n"] >= 2 and statistics.variance(d["diffs"]) > 0}
    if len(use) < 2:
        return per, None
    return per, random_effects([d["mean"] for d in use.values()],
                               [statistics.variance(d["diffs"]) / d["n"] for d in use.values()])


def _ci(d: dict) -> str:
    if not d["n"]:
        return "—"
    return f"{d['mean']:+.3f}" + (f" ± {d['half']:.3f}" if d["half"] is not None else "") + f" (n={d['n']})"


def _re(re) -> str:
    if re is None:
        return "— (needs >= 2 settings with >= 2 paired seeds)"
    return (f"{re.mean:+.3f} [{re.lo:+.3f}, {re.hi:+.3f}] (k={re.k}; τ = {re.tau:.3f}, I² = {re.i2:.0%}; "
            f"DL normal CI [{re.lo_z:+.3f}, {re.hi_z:+.3f}])")


def verdict(re) -> str:
    """The plan's rule on a random-effects TRB - OPD estimate."""
    if re is None:
        return "no estimate yet"
    if re.lo > 0:
        v = "TRB helps across settings (CI above 0)"
    elif re.hi < 0:
        v = "TRB hurts across settings (CI below 0)"
    elif -0.05 < re.lo and re.hi < 0.05:
        v = "no effect of practical size (CI inside ±0.05)"
    else:
        v = f"inconclusive (CI [{re.lo:+.3f}, {re.hi:+.3f}])"
    return v + ("; the effect depends on the setting (τ ≥ 0.05)" if re.tau >= 0.05 else "")


def matched_verdict(d: dict) -> str:
    if d["half"] is None:
        return "no CI yet"
    lo, hi = d["mean"] - d["half"], d["mean"] + d["half"]
    if lo > 0:
        return "the controller beats the matched linear schedule (CI above 0)"
    if hi < 0:
        return "the matched linear schedule beats the controller (CI below 0)"
    if -0.05 < lo and hi < 0.05:
        return "no difference of practical size (CI inside ±0.05)"
    return f"inconclusive (CI [{lo:+.3f}, {hi:+.3f}])"


def pair_rows() -> list[str]:
    from trb_exp.models import embedded_dir_of
    from trb_exp.prepare import pair_spec

    L = ["| setting | pair key | teacher pass@1 | student pass@1 | build s (one core) |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        p = embedded_dir_of(PAIR[s]) / "prepare.json"
        key = pair_spec(PAIR[s]).key()
        if p.is_file() and (j := json.loads(p.read_text())).get("key") == key:
            L.append(f"| {s} | `{key}` | {j['teacher']['eval']['pass@1']:.3f} | {j['student']['eval']['pass@1']:.3f} "
                     f"| {j['seconds']:.0f} |")
        else:
            L.append(f"| {s} | `{key}` | not built yet | | |")
    return L


def _mean_ci(xs) -> str:
    from trb_exp.analysis.stats import mean_ci

    m, h, _ = mean_ci(xs)
    return f"{m:.3f}" + (f" ± {h:.3f}" if h is not None else "")


def arm_rows(runs: dict) -> list[str]:
    L = ["| setting | arm | runs (seeds) | reused | AUC | final pass@1 | pass@1 at step 50 | reached 0.3 | "
         "train min (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for s in SETTINGS:
        for a in ARM_ORDER:
            recs = runs[s][a]
            if not recs:
                continue
            seeds = sorted(recs)
            r = [recs[x] for x in seeds]
            n_reused = sum((POWERED / s / a / f"seed_{x}" / "summary.json").is_file() for x in seeds) \
                if a in (*REUSED_ARMS, "trb_reward") else 0
            span = (str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}") \
                if seeds == list(range(seeds[0], seeds[-1] + 1)) else ",".join(map(str, seeds))
            L.append(f"| {s} | {a} | {len(r)} ({span}) | {n_reused} | {_mean_ci([auc(x.evals) for x in r])} | "
                     f"{_mean_ci([x.evals[max(x.evals)] for x in r])} | {_mean_ci([x.evals[50] for x in r])} | "
                     f"{sum(steps_to(x.evals) is not None for x in r)}/{len(r)} | {median(x.train_s for x in r) / 60:.1f} |")
    return L


def primary_section(runs: dict) -> list[str]:
    L = []
    for arm in ("trb", "trb_sel"):
        per, re = across(runs, arm, "opd")
        _, re_wo = across(runs, arm, "opd", SETTINGS[1:])
        L += [f"**{arm} − opd** (AUC, paired by seed)", "", "| setting | mean ± 95% CI (n) |", "|---|---|"]
        L += [f"| {s} | {_ci(d)} |" for s, d in per.items()]
        L += ["", f"- random effects over the settings: {_re(re)}",
              f"- without mini_a (the selection setting): {_re(re_wo)}", ""]
    return L


def jump_discordance(runs: dict) -> tuple[int, int, int]:
    """Over the (setting, seed) pairs where trb and opd both finished: (trb alone reached pass@1 >= TARGET,
    opd alone did, pairs)."""
    b = c = n = 0
    for s in SETTINGS:
        for seed in sorted(set(runs[s]["trb"]) & set(runs[s]["opd"])):
            t, o = (steps_to(runs[s][x][seed].evals) is not None for x in ("trb", "opd"))
            b, c, n = b + (t and not o), c + (o and not t), n + 1
    return b, c, n


def pooled_matched(runs: dict, arm: str, base: str, fn) -> dict:
    """``arm`` − ``base`` of ``fn(record)``, paired by (setting, seed) over the matched control's seeds."""
    from trb_exp.analysis.stats import paired_difference

    a = {(s, x): fn(r) for s in MATCHED_SEEDS for x, r in runs[s][arm].items() if x in MATCHED_SEEDS[s]}
    b = {(s, x): fn(r) for s in MATCHED_SEEDS for x, r in runs[s][base].items() if x in MATCHED_SEEDS[s]}
    return paired_difference(a, b)


def jump_section(runs: dict) -> list[str]:
    from trb_exp.analysis.stats import mcnemar_exact

    L = ["| setting | " + " | ".join(a for a in MAIN_ARMS) + " |", "|---|" + "---|" * len(MAIN_ARMS)]
    for s in SETTINGS:
        cells = []
        for a in MAIN_ARMS:
            r = runs[s][a]
            cells.append(f"{sum(steps_to(x.evals) is not None for x in r.values())}/{len(r)}" if r else "—")
        L.append(f"| {s} | " + " | ".join(cells) + " |")
    b, c, n = jump_discordance(runs)
    L += ["", f"Pooled over the {n} (setting, seed) pairs with both arms: TRB alone reached 0.3 in {b}, OPD alone in "
          f"{c}; exact McNemar p = {mcnemar_exact(b, c):.3f}.", ""]
    return L


def matched_section(runs: dict) -> list[str]:
    L = ["| comparison | metric | " + " | ".join(MATCHED_SEEDS) + " | pooled |", "|---|---|" + "---|" * (len(MATCHED_SEEDS) + 1)]
    pooled_auc = None
    for arm, base in (("trb_reward", "trb_matched"), ("trb_matched", "opd"), ("trb_matched", "trb")):
        for name, fn in (("AUC", lambda r: auc(r.evals)), ("final", lambda r: r.evals[max(r.evals)])):
            cells = [_ci(paired(runs, s, arm, base, fn)) for s in MATCHED_SEEDS]
            d = pooled_matched(runs, arm, base, fn)
            if (arm, base, name) == ("trb_reward", "trb_matched", "AUC"):
                pooled_auc = d
            L.append(f"| {arm} − {base} | {name} | " + " | ".join(cells) + f" | {_ci(d)} |")
    L += ["", f"**Rule (pooled trb_reward − trb_matched AUC): {matched_verdict(pooled_auc)}.**", ""]
    return L


def selection_section(runs: dict) -> list[str]:
    grid = runs["selection"]
    L = ["| eps0 | K | seeds done | validation AUC (mean) | test AUC (mean) |", "|---|---|---|---|---|"]
    for e in GRID_EPS0:
        for k in GRID_K:
            cell = grid.get(f"eps0_{e:g}_K_{k}", {})
            recs = [cell[s] for s in SELECTION_SEEDS if s in cell]
            v = f"{sum(auc(r.val) for r in recs) / len(recs):.3f}" if recs else "—"
            t = f"{sum(auc(r.evals) for r in recs) / len(recs):.3f}" if recs else "—"
            L.append(f"| {e:g} | {k} | {len(recs)}/{len(SELECTION_SEEDS)} | {v} | {t} |")
    sel = selection_of(runs)
    L += ["", f"Selected: eps0 = {sel[0]:g}, K = {sel[1]}." if sel else "Selected: not yet (the grid is incomplete).", ""]
    return L


def compute_section(runs: dict) -> list[str]:
    """Runs made by this study (reused powered runs excluded) and their measured training minutes."""
    blocks: dict = {"matched": [], "selection": [], "main": []}
    for s in SETTINGS:
        for a in ("opd", "trb", "trb_sel", "trb_matched"):
            for seed, r in runs[s][a].items():
                if a in REUSED_ARMS and (POWERED / s / a / f"seed_{seed}" / "summary.json").is_file():
                    continue
                blocks["matched" if a == "trb_matched" else "main"].append(r.train_s)
    for cell in runs["selection"].values():
        blocks["selection"] += [r.train_s for r in cell.values()]
    L = ["Wall minutes of one torch thread (`train_s`: the training steps and evaluations after step 0) on a "
         "2-core machine shared with other jobs at higher priority: upper bounds on the CPU time.", "",
         "| block | runs | measured minutes (sum of train_s) | minutes per run (median) |", "|---|---|---|---|"]
    for b, xs in blocks.items():
        L.append(f"| {b} | {len(xs)} | {sum(xs) / 60:.1f} | " + (f"{median(xs) / 60:.1f}" if xs else "—") + " |")
    total = [x for xs in blocks.values() for x in xs]
    L.append(f"| all | {len(total)} | {sum(total) / 60:.1f} | " + (f"{median(total) / 60:.1f}" if total else "—") + " |")
    return L


def plot_curves(runs: dict, path: Path, x: str) -> None:
    """Per setting, pass@1 (mean over seeds) of every arm against the step (x="step") or against the
    cumulative training minutes at that step, median over seeds (x="wall": the compute-matched view)."""
    from matplotlib.figure import Figure

    from trb_exp.analysis.plots import save_png

    fig = Figure(figsize=(15, 3.6), layout="constrained")
    axes = fig.subplots(1, len(SETTINGS), sharey=True)
    for ax, s in zip(axes, SETTINGS):
        for a in ARM_ORDER:
            recs = [r for r in runs[s][a].values() if x == "step" or len(r.wall) == len(r.evals)]
            if not recs:
                continue
            steps = sorted(set.intersection(*(set(r.evals) for r in recs)))
            ys = [sum(r.evals[st] for r in recs) / len(recs) for st in steps]
            xs = steps if x == "step" else [median(r.wall[st] for r in recs) / 60 for st in steps]  # median: robust
            ax.plot(xs, ys, marker="o", ms=3, lw=2 if a in ("opd", "trb") else 1.2, label=f"{a} ({len(recs)})")
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("step" if x == "step" else "training minutes (one thread, shared machine)", fontsize=8)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("test pass@1 (mean over seeds)")
    save_png(fig, path)


def plot_jumps(runs: dict, path: Path) -> None:
    """Time to the jump: per arm, pooled over settings, the share of runs with pass@1 >= 0.3 by each step."""
    from matplotlib.figure import Figure

    from trb_exp.analysis.plots import save_png

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for a in ARM_ORDER:
        recs = [r for s in SETTINGS for r in runs[s][a].values()]
        if not recs:
            continue
        steps = sorted(set().union(*(r.evals for r in recs)))
        share = [sum(1 for r in recs if (t := steps_to(r.evals)) is not None and t <= st) / len(recs) for st in steps]
        ax.step(steps, share, where="post", label=f"{a} ({len(recs)} runs)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"share of runs with pass@1 ≥ {TARGET}")
    ax.legend(fontsize=8)
    save_png(fig, path)


def selection_of(runs: dict) -> tuple[float, int] | None:
    """The selected (eps0, K) from the collected selection runs; None until the grid is complete."""
    grid = runs["selection"]
    return selected(lambda rel: grid.get(rel.split("/")[2], {}).get(int(rel.rsplit("_", 1)[1])))


def main_arms(runs: dict) -> tuple[str, ...]:
    """The arms the main comparison runs: trb_sel is the trb arm when the selection picks the frozen point."""
    return ("opd", "trb") if selection_of(runs) == (FROZEN["eps0"], FROZEN["K"]) else MAIN_ARMS


def findings_section(runs: dict, final: bool) -> list[str]:
    """What the study found, in sentences built from the same numbers as the tables above (no free text)."""
    from trb_exp.analysis.stats import mcnemar_exact

    L = ["## What it found" + ("" if final else " (so far: interim, on the seeds finished)"), ""]
    per, re = across(runs, "trb", "opd")
    done = {s: d for s, d in per.items() if d["n"]}
    if re is None:
        L.append("- **TRB (frozen) − OPD**: too few settings with paired seeds for an estimate across settings.")
    else:
        _, re_wo = across(runs, "trb", "opd", SETTINGS[1:])
        L.append(f"- **TRB at the frozen configuration (eps0 = {FROZEN['eps0']:g}, K = {FROZEN['K']}) − OPD, AUC, "
                 f"over {re.k} settings: {re.mean:+.3f}, 95% CI [{re.lo:+.3f}, {re.hi:+.3f}]**, between-setting SD "
                 f"τ = {re.tau:.3f}: {verdict(re)}. Per setting: "
                 + "; ".join(f"{s} {_ci(d)}" for s, d in done.items()) + "."
                 + (f" Without mini_a, where that configuration was chosen: {re_wo.mean:+.3f} "
                    f"[{re_wo.lo:+.3f}, {re_wo.hi:+.3f}]." if re_wo is not None else ""))
    sel = selection_of(runs)
    if sel is None:
        L.append("- **The configuration selected on validation** is not known yet (the grid is incomplete).")
    elif sel == (FROZEN["eps0"], FROZEN["K"]):
        L.append(f"- **Selection on mini_a's validation split** picked eps0 = {sel[0]:g}, K = {sel[1]}: the frozen "
                 "configuration, so `trb_sel` is the `trb` arm.")
    else:
        _, re_sel = across(runs, "trb_sel", "opd")
        L.append(f"- **Selection on mini_a's validation split** picked eps0 = {sel[0]:g}, K = {sel[1]}; `trb_sel` − "
                 f"OPD across settings: " + (f"{re_sel.mean:+.3f} [{re_sel.lo:+.3f}, {re_sel.hi:+.3f}], "
                                              f"{verdict(re_sel)}." if re_sel is not None else "no estimate yet."))
    b, c, n = jump_discordance(runs)
    if n:
        L.append(f"- **Reaching pass@1 ≥ {TARGET} by step 250**: of {n} paired (setting, seed) runs, TRB alone "
                 f"reached it in {b}, OPD alone in {c} (exact McNemar p = {mcnemar_exact(b, c):.3f}).")
    d = pooled_matched(runs, "trb_reward", "trb_matched", lambda r: auc(r.evals))
    if d["n"]:
        spent = {arm: median(sum(r.eps.values()) for st in MATCHED_SEEDS for r in runs[st][arm].values())
                 for arm in ("trb_reward", "trb") if all(runs[st][arm] for st in MATCHED_SEEDS)}
        v = matched_verdict(d)
        L.append(f"- **The reward budget against a linear schedule with its measured budget and hand-over**: "
                 f"AUC {_ci(d)} pooled over mini_a and mini_b: {v}."
                 + (f" The powered study's \"the reward budget beats the selected grid point\" compared arms whose "
                    f"budgets differ {spent['trb_reward'] / spent['trb']:.0f}-fold (median Σ eps "
                    f"{spent['trb_reward']:.1f} against {spent['trb']:.1f} nats·steps)"
                    if len(spent) == 2 and spent["trb"] > 0 else "")
                 + ("; given the same budget and hand-over, the plain linear schedule does as well." if
                    v.startswith("no difference") else "."))
    return L + [""]


def build_report(runs: dict, plan_commit: str, command: str) -> str:
    final = all(len(runs[s][a]) >= len(SEEDS) for s in SETTINGS for a in main_arms(runs))
    envs = sorted({(r.env or {}).get("commit") or "?" for s in SETTINGS for a in ("opd", "trb", "trb_sel", "trb_matched")
                   for r in runs[s][a].values() if r.env} | {(r.env or {}).get("commit") or "?"
                   for c in runs["selection"].values() for r in c.values() if r.env})
    isas = sorted({r.env.get("cpu_capability") for s in SETTINGS for a in ARM_ORDER for r in runs[s][a].values() if r.env}
                  | {r.env.get("cpu_capability") for c in runs["selection"].values() for r in c.values() if r.env})
    L = ["# The generalisation study: TRB vs OPD on five settings" + ("" if final else " (INTERIM)"), "",
         f"Pre-registered in [PLAN.md](PLAN.md) (commit `{plan_commit}`, before any run). Every number below is "
         "computed by `scripts/generalisation_study.py report` from the committed runs in `runs.jsonl.gz` and the "
         "powered study's reused runs (`docs/results/powered/runs.jsonl.gz`).", ""]
    if not final:
        L += ["**Interim**: the study is not complete (10 seeds × 3 arms × 5 settings). Each comparison below uses "
              "the seeds on which both of its arms have finished; no verdict is final.", ""]
    L += ["Deviations from PLAN.md, decided before any run finished, independent of outcomes: (1) a run interrupted "
          "by the end of a session resumes from its newest checkpoint (bit-identical to an uninterrupted run, "
          "`tests/test_checkpoint_resume.py`) instead of restarting from scratch; (2) while the study is incomplete, "
          "each comparison uses the seeds on which both of its arms have finished.", ""]
    L += [f"New runs made by code at commit(s) {', '.join(f'`{c[:10]}`' for c in envs) or '—'}; CPU capability "
          f"{', '.join(map(str, isas)) or '—'} (values agree bit for bit only within one ISA).", "",
          "## Settings (pairs)", "", *pair_rows(), "", "## Runs per cell", "",
          "Mean ± 95% Student-t CI over the finished seeds. `reused`: runs of the powered study (same command).", "",
          *arm_rows(runs), "", "## Primary: TRB − OPD across settings", "",
          "Per setting, the paired per-seed AUC difference; across settings, DerSimonian–Laird random effects "
          "with the Hartung–Knapp CI (t, k − 1 df) and τ, the between-setting SD.", "", *primary_section(runs),
          "## Secondary: reaching pass@1 ≥ 0.3 by step 250", "", *jump_section(runs),
          "## The budget-matched control (mini_a, mini_b)", "",
          "`trb_matched`: linear, eps0 and K from the reward controller's measured total budget and hand-over "
          "(PLAN.md): " + "; ".join(f"{s}: eps0 = {m.eps0}, K = {m.K}" for s, m in
                                   ((s, matched_schedule(s)) for s in MATCHED_SEEDS)) + ".", "", *matched_section(runs),
          "## Selection grid (mini_a, validation split, seeds " + ", ".join(map(str, SELECTION_SEEDS)) + ")", "",
          *selection_section(runs), "## Compute spent", "", *compute_section(runs), ""]
    per, re = across(runs, "trb", "opd")
    L += ["## Verdict (the plan's rules" + (")" if final else "; interim, on what is complete)"), "",
          f"- **TRB − OPD across settings**: {_re(re)}: {verdict(re)}.",
          f"- **trb_sel − OPD across settings**: {verdict(across(runs, 'trb_sel', 'opd')[1])}.", "",
          *findings_section(runs, final),
          "![pass@1 per step](curves.png)", "",
          "The compute-matched view below places each evaluation at the median cumulative training minutes (Σ "
          "`time/step_s`). Those are wall minutes and follow the machine's load when each run ran: the powered "
          "study's reused runs ran on a quieter machine than this study's, so compare arms only within runs made "
          "under the same conditions (the powered study's own view: `docs/results/powered/compute_matched.md`).", "",
          "![pass@1 per training minute](curves_wall.png)", "",
          "![time to the jump](jumps.png)", "",
          "## Reproducing the runs" if final else "## To continue the study", "",
          "The runs use the code of commit `e46b301` in a worktree of their own (`git -C <repo> worktree add --detach "
          "/work/wt-study-runs e46b301`, with its own `.venv`: `pip install torch==2.13.0 && pip install -e .`); the "
          + ("runner, given an empty `--out` and a `--committed` folder with no runs, re-runs every new run (the "
             "powered study's runs are reused as in PLAN.md); values repeat bit for bit only on the same CPU model "
             "and library versions:" if final else
             "runner skips every run in `runs.jsonl.gz` (and those reused from the powered study) and resumes "
             "interrupted ones from their checkpoints:"), "",
          "    nice -n 19 python scripts/generalisation_study.py run --out /work/study_runs/generalisation --lanes 2 \\",
          "        --pairs-from trb_exp/assets --code /work/wt-study-runs" + (" --committed /tmp/empty" if final else ""), "",
          "then `python scripts/collect_runs.py /work/study_runs/generalisation docs/results/generalisation/runs.jsonl.gz` "
          "and `python scripts/generalisation_study.py report`.", "", "---", f"`{command}`", ""]
    return "\n".join(L)


def cmd_report(args) -> None:
    out = Path(args.out)
    src = Path(args.runs)
    runs = collect([unpacked(src) if src.is_file() else src])
    recorded = ROOT / "docs" / "results" / "generalisation" / "PLAN.commit"  # no git history needed (a tarball)
    plan_commit = recorded.read_text().strip() if recorded.is_file() else subprocess.run(
        ["git", "log", "--diff-filter=A", "-1", "--format=%h", "--", "docs/results/generalisation/PLAN.md"],
        cwd=ROOT, capture_output=True, text=True).stdout.strip() or "unknown"
    command = f"python scripts/generalisation_study.py report --runs {args.runs} --out {args.out}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(build_report(runs, plan_commit, command))
    plot_curves(runs, out / "curves.png", "step")
    plot_curves(runs, out / "curves_wall.png", "wall")
    plot_jumps(runs, out / "jumps.png")
    print(f"[report] {out / 'README.md'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("matched")
    m.add_argument("--powered", default=str(POWERED))
    r = sub.add_parser("run")
    r.add_argument("--out", default="/work/study_runs/generalisation")
    r.add_argument("--lanes", type=int, default=2)
    r.add_argument("--committed", default=str(COMMITTED), help="finished runs already committed")
    r.add_argument("--pairs-from", default=None, help="a folder of built pairs embedded_<p>/ (key-checked)")
    r.add_argument("--no-wait", dest="wait", action="store_false", help="stop when only blocked runs are left")
    r.add_argument("--code", default=str(ROOT), help="the checkout (with its .venv) the runs use (default: this one)")
    st = sub.add_parser("status")
    st.add_argument("--out", default="/work/study_runs/generalisation")
    st.add_argument("--committed", default=str(COMMITTED))
    rp = sub.add_parser("report")
    rp.add_argument("--runs", default="docs/results/generalisation/runs.jsonl.gz")
    rp.add_argument("--out", default="docs/results/generalisation")
    args = p.parse_args(argv)
    {"matched": cmd_matched, "run": cmd_run, "status": cmd_status, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
