#!/usr/bin/env python3
"""The engine issue's CPU acceptance measurement: rollout.engine=eager vs static on the embedded default,
OPD steps and TRB warmup steps, in one script, alternating, several rounds.

Each round runs the CLI four times, in the order (OPD eager, OPD static, TRB eager, TRB static) on even
rounds and reversed on odd ones, with the same seed and config (one torch thread, ``trainer.max_steps``
steps, no evaluation beyond a tiny one, ``schedule.eps0=0.5 schedule.warmup_steps=100000``: every TRB step
is a warmup step). From every run's ``metrics.jsonl`` it takes the per-step ``time/step_s`` and
``rollout/decode_s`` (first two steps left out) and ``trb/solver_share``; it reports per configuration the
median over all rounds' steps, and the per-round medians, then:

* OPD decode time, static vs eager (goal: at least 40% lower);
* TRB warmup step / OPD step, per engine (goal: <= 1.4 for static);
* where a TRB step's time goes (decode of two models + solver vs the rest).

    python scripts/bench_engine_cpu.py                     # 3 rounds x 4 runs x 25 steps, writes docs/engine_cpu.md
    python scripts/bench_engine_cpu.py --rounds 1 --steps 8 --out ''
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [("opd", "eager"), ("opd", "static"), ("trb", "eager"), ("trb", "static")]


def run(method: str, engine: str, steps: int, run_dir: Path, extra: list[str]) -> list[dict]:
    ov = [f"method={method}", f"rollout.engine={engine}", f"trainer.max_steps={steps}", "trainer.eval_every=0",
          "trainer.eval_size=8", "trainer.eval_samples=1", "trainer.save_student=false", "logger=none", "threads=1",
          "seed=0", "schedule.eps0=0.5", "schedule.warmup_steps=100000", f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "trb_exp.train", *ov], cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{method}/{engine} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in rows if "train/loss" in x][2:]


def load_state() -> str:
    try:
        la = os.getloadavg()
        return f"load average {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} on {os.cpu_count()} CPUs"
    except OSError:
        return f"{os.cpu_count()} CPUs"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default=str(REPO / "docs" / "engine_cpu.md"))
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    a = ap.parse_args(argv)
    steps: dict = {c: [] for c in CONFIGS}
    per_round: dict = {c: [] for c in CONFIGS}
    states = [load_state()]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            order = CONFIGS if rnd % 2 == 0 else CONFIGS[::-1]
            for method, engine in order:
                rows = run(method, engine, a.steps, Path(tmp) / f"{rnd}_{method}_{engine}", a.extra)
                steps[method, engine] += rows
                per_round[method, engine].append({k: statistics.median(r[k] for r in rows)
                                                  for k in ("time/step_s", "rollout/decode_s")})
                print(f"round {rnd} {method:3s} {engine:6s} step {per_round[method, engine][-1]['time/step_s']:.3f} s "
                      f"decode {per_round[method, engine][-1]['rollout/decode_s']:.3f} s", flush=True)
            states.append(load_state())
    med = {c: {k: statistics.median(r[k] for r in steps[c]) for k in ("time/step_s", "rollout/decode_s")}
           for c in CONFIGS}
    for c in CONFIGS:
        if c[0] == "trb":
            med[c]["solver_share"] = statistics.median(r["trb/solver_share"] for r in steps[c])
            med[c]["decode_steps"] = statistics.median(r["rollout/decode_steps"] for r in steps[c])
        else:
            med[c]["decode_steps"] = statistics.median(r["rollout/decode_steps"] for r in steps[c])
    opd_cut = 1 - med["opd", "static"]["rollout/decode_s"] / med["opd", "eager"]["rollout/decode_s"]
    ratio = {e: med["trb", e]["time/step_s"] / med["opd", e]["time/step_s"] for e in ("eager", "static")}
    # paired within each round (the four runs of a round ran back to back): robust to a busy round
    pr = lambda a, b, k: [x[k] / y[k] for x, y in zip(per_round[a], per_round[b])]  # noqa: E731
    round_cut = [1 - r for r in pr(("opd", "static"), ("opd", "eager"), "rollout/decode_s")]
    round_ratio = {e: pr(("trb", e), ("opd", e), "time/step_s") for e in ("eager", "static")}
    res = {"median": {f"{m}/{e}": v for (m, e), v in med.items()},
           "per_round": {f"{m}/{e}": v for (m, e), v in per_round.items()},
           "opd_decode_cut": opd_cut, "trb_over_opd": ratio, "round_opd_decode_cut": round_cut,
           "round_trb_over_opd": round_ratio, "machine": states, "wall_s": time.time() - t0}
    f3 = "{:.3f}".format
    lines = [
        "# rollout.engine: eager vs static on CPU (embedded default)",
        "",
        f"Generated by `scripts/bench_engine_cpu.py --rounds {a.rounds} --steps {a.steps}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({platform.machine()}, torch threads = 1). "
        f"Machine state (shared, other jobs running): {'; '.join(states)}. Wall time {res['wall_s']:.0f} s.",
        "",
        "Every run: `trainer.max_steps=%d seed=0 schedule.eps0=0.5 schedule.warmup_steps=100000` (TRB: every step a "
        "warmup step), 64 rollouts per step, `trainer.max_new_tokens=40`; the first two steps of each run are left "
        "out; medians over all rounds' steps (n = %d per configuration), then the per-round medians." % (
            a.steps, len(steps["opd", "eager"])),
        "",
        "| method | engine | step s | decode s (`rollout/decode_s`) | decode loop iterations | per-round step s | per-round decode s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in CONFIGS:
        lines.append(f"| {c[0]} | {c[1]} | {f3(med[c]['time/step_s'])} | {f3(med[c]['rollout/decode_s'])} | "
                     f"{med[c]['decode_steps']:.0f} | "
                     f"{', '.join(f3(r['time/step_s']) for r in per_round[c])} | "
                     f"{', '.join(f3(r['rollout/decode_s']) for r in per_round[c])} |")
    trb_s = med["trb", "static"]
    lines += [
        "",
        f"- OPD decode time, static vs eager: **{100 * opd_cut:.0f}% lower** over all steps; per round "
        f"{', '.join(f'{100 * c:.0f}%' for c in round_cut)} (median **{100 * statistics.median(round_cut):.0f}%**) "
        "(goal: at least 40%).",
        f"- TRB warmup step / OPD step: eager **{ratio['eager']:.2f}**, static **{ratio['static']:.2f}** over all steps; "
        f"per round eager {', '.join(f'{x:.2f}' for x in round_ratio['eager'])}, static "
        f"{', '.join(f'{x:.2f}' for x in round_ratio['static'])} (medians {statistics.median(round_ratio['eager']):.2f}, "
        f"**{statistics.median(round_ratio['static']):.2f}**) (goal: <= 1.4).",
        f"- TRB static step {f3(trb_s['time/step_s'])} s = decode {f3(trb_s['rollout/decode_s'])} s (of which the solver "
        f"{100 * trb_s['solver_share']:.0f}%) + {f3(trb_s['time/step_s'] - trb_s['rollout/decode_s'])} s rest (student "
        f"forward/backward over the micro-batches, logging); OPD static step {f3(med['opd', 'static']['time/step_s'])} s = "
        f"decode {f3(med['opd', 'static']['rollout/decode_s'])} s + {f3(med['opd', 'static']['time/step_s'] - med['opd', 'static']['rollout/decode_s'])} s "
        "rest (a batched teacher pass, the student forward/backward, logging).",
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    if a.out:
        Path(a.out).write_text(md)
        Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
