#!/usr/bin/env python3
"""What does TRB cost over plain OPD, and does it become plain OPD after the warmup?

Runs the CLI twice on the same config, seed and number of steps -- ``method=trb schedule=linear`` and
``method=opd`` -- for ``2K`` steps (``K = schedule.warmup_steps``), one torch thread each, one after the
other, then reads both ``metrics.jsonl`` and reports:

* mean step time during the warmup (k < K) and after it (k >= K), TRB vs OPD, with the std and a 95%
  bootstrap CI of the mean, and the TRB/OPD ratio of the means (bootstrap CI);
* the solver's share of the rollout (decode) time during the warmup (``trb/solver_share``);
* PASS/FAIL checks: the realised max KL(mu||pi_S) never exceeds the logged budget (+1e-6) on any step;
  the budget is exactly 0 and ``trb/beta_mean`` = 0 from step K on; ``trb/frac_beta_pos`` = 0 after K.

Step k (0-based) is logged as ``step = k + 1``. The first step of each run (one-time initialisation) is
left out of the timing means. Timings are wall-clock on a possibly shared machine: compare the two runs
made by one invocation, not numbers from different machines.

    python bench/trb_overhead.py                                    # embedded default, K = 50, 100 steps
    python bench/trb_overhead.py --warmup-steps 25 --eps0 0.05      # shorter
    python bench/trb_overhead.py -- model.student=DIR model.teacher=DIR trainer.max_new_tokens=24
    python bench/trb_overhead.py --out ''                           # print only

Everything after ``--`` is passed to both runs as Hydra overrides. Produces docs/trb_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trb_exp.analysis.stats import bootstrap_ci, ratio_ci  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-6


def run_cli(method: str, overrides: list[str], run_dir: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own scratch run (a finished run dir is never reused)
    cmd = [sys.executable, "-m", "trb_exp.train", f"method={method}", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{method} run failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.time() - t0


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "train/loss" in r]


def describe(xs) -> str:
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    lo, hi = bootstrap_ci(xs)
    return f"{statistics.fmean(xs):.3f} ± {sd:.3f} [{lo:.3f}, {hi:.3f}] (n={len(xs)})"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup-steps", type=int, default=50, help="K (schedule.warmup_steps)")
    ap.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default 2K)")
    ap.add_argument("--eps0", type=float, default=None, help="schedule.eps0 (default: conf/schedule/linear.yaml)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trb-first", action="store_true", help="run TRB before OPD (checks run-order drift)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the two run dirs under this folder")
    ap.add_argument("--from", dest="from_dir", type=Path, default=None,
                    help="no training: re-analyse the opd/ and trb/ run dirs kept by an earlier --keep")
    ap.add_argument("--out", default=str(REPO / "docs" / "trb_overhead.md"), help="markdown report ('' = none)")
    ap.add_argument("--note", default="", help="a sentence appended to the report (e.g. the machine's load)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs (after --)")
    a = ap.parse_args(argv)
    a.steps = a.steps or 2 * a.warmup_steps
    if a.steps <= a.warmup_steps:
        ap.error("--steps must exceed --warmup-steps to measure the post-warmup phase")
    return a


def common_overrides(a: argparse.Namespace) -> list[str]:
    """The overrides both runs share: 2K steps of the linear schedule, no evaluation to speak of, one thread."""
    common = ["schedule=linear", f"schedule.warmup_steps={a.warmup_steps}", f"trainer.max_steps={a.steps}",
              f"seed={a.seed}", "trainer.eval_every=0", "trainer.eval_size=8", "trainer.eval_samples=1",
              "trainer.save_student=false", "logger=none", "threads=1"]
    if a.eps0 is not None:
        common.append(f"schedule.eps0={a.eps0}")
    return common + a.overrides


def obtain_runs(a: argparse.Namespace, common: list[str]) -> tuple[Path, dict, dict, list[str]]:
    """Train both runs (or, with --from, read kept ones): their root folder, wall times, metadata, overrides."""
    if a.from_dir:
        root = a.from_dir
        meta = json.loads((root / "runs.json").read_text()) if (root / "runs.json").exists() else {}
        wall = meta.get("wall_s", {"opd": float("nan"), "trb": float("nan")})
        return root, wall, meta, meta.get("overrides", common)
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="trb_overhead_"))
    root.mkdir(parents=True, exist_ok=True)
    order = ("trb", "opd") if a.trb_first else ("opd", "trb")
    wall = {m: run_cli(m, common, root / m) for m in order}
    (root / "runs.json").write_text(json.dumps({"wall_s": wall, "overrides": common,
                                                "date": time.strftime("%Y-%m-%d %H:%M")}))
    return root, wall, {}, common


def load_rows(root: Path, steps: int) -> dict[str, list[dict]]:
    rows = {m: train_rows(root / m) for m in ("opd", "trb")}
    for m, rs in rows.items():
        if [r["step"] for r in rs] != list(range(1, steps + 1)):
            sys.exit(f"{m}: expected one logged row per step 1..{steps} (trainer.log_every=1)")
    return rows


def timing_series(rows: dict[str, list[dict]], K: int) -> SimpleNamespace:
    """Per (method, phase) the step times, decode times, decode time per loop iteration and loop iterations;
    the solver's share and time per TRB warmup step. Phase "warm": 1 <= k < K (first step left out); "post": k >= K."""
    def col(m, key, phase):
        keep = (lambda k: 1 <= k < K) if phase == "warm" else (lambda k: k >= K)
        return [r[key] for r in rows[m] if keep(r["step"] - 1) and key in r]

    mp = [(m, p) for m in ("opd", "trb") for p in ("warm", "post")]
    # decode time per loop iteration: the loop runs until the longest response ends, so this removes the
    # effect of the two students generating different lengths
    return SimpleNamespace(
        st={k: col(k[0], "time/step_s", k[1]) for k in mp},
        dec={k: col(k[0], "rollout/decode_s", k[1]) for k in mp},
        per_it={k: [1e3 * d / n for d, n in zip(col(k[0], "rollout/decode_s", k[1]), col(k[0], "rollout/decode_steps", k[1]))]
                for k in mp},
        n_it={k: col(k[0], "rollout/decode_steps", k[1]) for k in mp},
        share=col("trb", "trb/solver_share", "warm"),
        solver_s=[r["trb/solver_share"] * r["rollout/decode_s"] for r in rows["trb"]
                  if 1 <= r["step"] - 1 < K and "trb/solver_share" in r],
    )


def run_checks(rows: dict[str, list[dict]], K: int) -> tuple[list[tuple[str, bool]], list]:
    """The PASS/FAIL checks on the logged budget and blending diagnostics, and the budget violations."""
    trb = rows["trb"]
    kl_rows = [r for r in trb if "trb/kl_behavior_student_max" in r]
    viol = [(r["step"] - 1, r["trb/kl_behavior_student_max"], r["trb/eps"]) for r in kl_rows
            if r["trb/kl_behavior_student_max"] > r["trb/eps"] + TOL or r.get("trb/kl_excess_max", 0.0) > TOL]
    post = [r for r in trb if r["step"] - 1 >= K]
    warm = [r for r in trb if r["step"] - 1 < K]
    checks = [
        (f"realised max KL(mu||pi_S) <= logged budget + {TOL:g} on every TRB step "
         f"({len(kl_rows)} steps with blending; worst excess "
         f"{max((r['trb/kl_behavior_student_max'] - r['trb/eps'] for r in kl_rows), default=0.0):+.2e})",
         bool(kl_rows) and not viol),
        (f"budget trb/eps is exactly 0 from step K={K} on ({len(post)} steps)",
         bool(post) and all(r["trb/eps"] == 0.0 for r in post)),
        ("trb/beta_mean = 0 from step K on", bool(post) and all(r.get("trb/beta_mean") == 0.0 for r in post)),
        ("trb/frac_beta_pos = 0 from step K on", bool(post) and all(r.get("trb/frac_beta_pos") == 0.0 for r in post)),
        ("no blending diagnostics after K (the teacher leaves the decode loop)",
         not any("trb/kl_behavior_student_max" in r for r in post)),
        ("the budget is > 0 and blending happens on every warmup step (k < K)",
         all(r["trb/eps"] > 0 and r.get("trb/frac_beta_pos", 0) > 0 for r in warm)),
        ("OPD's logged budget is 0 on every step", all(r["trb/eps"] == 0.0 for r in rows["opd"])),
    ]
    return checks, viol


def mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def ratio(p, xs):
    a_, b_ = xs[("trb", p)], xs[("opd", p)]
    lo, hi = ratio_ci(a_, b_)
    return f"**{mean(a_) / mean(b_):.2f}×** [{lo:.2f}, {hi:.2f}]"


def timing_table(s: SimpleNamespace, K: int) -> list[str]:
    lines = ["| phase | metric | OPD | TRB | TRB / OPD |", "|---|---|---|---|---|"]
    st, dec, per_it, n_it = s.st, s.dec, s.per_it, s.n_it
    for p, label in (("warm", f"warmup (1 ≤ k < {K})"), ("post", f"after warmup (k ≥ {K})")):
        lines.append(f"| {label} | step time | {describe(st[('opd', p)])} | {describe(st[('trb', p)])} | {ratio(p, st)} |")
        lines.append(f"| {label} | rollout (decode) time | {describe(dec[('opd', p)])} | {describe(dec[('trb', p)])} "
                     f"| {ratio(p, dec)} |")
        if per_it[("opd", p)] and per_it[("trb", p)]:
            lines.append(f"| {label} | decode time per token position (ms) | {describe(per_it[('opd', p)])} | "
                         f"{describe(per_it[('trb', p)])} | {ratio(p, per_it)} |")
            lines.append(f"| {label} | decode loop iterations (longest response) | {mean(n_it[('opd', p)]):.1f} | "
                         f"{mean(n_it[('trb', p)]):.1f} | |")
    o_w, o_p = per_it[("opd", "warm")], per_it[("opd", "post")]
    if o_w and o_p:
        lines.append(f"| noise reference | OPD against itself: decode time per position, k ≥ K over k < K (same "
                     f"code; differences are load on the machine) | {mean(o_p) / mean(o_w):.2f}× | | |")
    share, solver_s = s.share, s.solver_s
    return lines + [
        f"| warmup | solver share of rollout time (`trb/solver_share`) | – | {mean(share):.1%} "
        f"(min {min(share, default=float('nan')):.1%}, max {max(share, default=float('nan')):.1%}) | |",
        f"| warmup | solver time per step / share of step time | – | {mean(solver_s):.3f} s / "
        f"{mean(solver_s) / mean(st[('trb', 'warm')]):.1%} | |",
    ]


def command(a: argparse.Namespace) -> str:
    """The command line that trains these runs (options that change them only)."""
    opts = [("--warmup-steps", a.warmup_steps, 50), ("--steps", a.steps, 2 * a.warmup_steps), ("--eps0", a.eps0, None),
            ("--seed", a.seed, 0)]
    cmd = "python bench/trb_overhead.py" + "".join(f" {k} {v}" for k, v, default in opts if v != default)
    return cmd + (" --trb-first" if a.trb_first else "") + (" -- " + " ".join(a.overrides) if a.overrides else "")


def render(a: argparse.Namespace, s: SimpleNamespace, checks, viol, wall: dict, meta: dict, common: list[str]) -> str:
    K = a.warmup_steps
    lines = [
        "# TRB overhead vs plain OPD",
        "",
        f"Generated by `{command(a)}` on {meta.get('date') or time.strftime('%Y-%m-%d %H:%M')} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads = 1).",
        f"Both runs: `{' '.join(common)}`; method=trb vs method=opd, {a.steps} steps, K = {K}. "
        f"Wall time per run (incl. start-up, loading, one small eval): OPD {wall['opd']:.0f} s, TRB {wall['trb']:.0f} s.",
        "",
        "Times in seconds (ms where stated): mean ± std [95% bootstrap CI of the mean] (n steps); the first step",
        "is left out. The decode loop runs until the longest response of the batch ends, so rollout time also",
        "depends on how long the two (diverging) students answer; the per-position row removes that.",
        "",
        *timing_table(s, K),
        "",
        "Checks:",
        "",
    ]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    if viol:
        lines.append(f"  - violations (k, kl_max, eps): {viol[:5]}")
    lines += [
        "",
        "During the warmup TRB also runs the teacher inside the decode loop (one KV-cached teacher step per token)",
        "and the solver; OPD runs the teacher once, batched, after decoding. From k = K the budget is 0, the rule",
        "is the student's, and a TRB step is an OPD step (ratio ~1 up to machine noise).",
    ]
    if a.note:
        lines += ["", f"Note: {a.note}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = parse_args(argv)
    root, wall, meta, common = obtain_runs(a, common_overrides(a))
    rows = load_rows(root, a.steps)
    checks, viol = run_checks(rows, a.warmup_steps)
    text = render(a, timing_series(rows, a.warmup_steps), checks, viol, wall, meta, common)
    print()
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
