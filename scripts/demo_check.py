"""Measure the README's first-run claims on this machine: for each method, run the embedded
default through the CLI (as a user would), and tabulate wall time, training time, peak memory and
pass@1 before/after. Writes docs/demo_results.md.

    python scripts/demo_check.py [method ...]        # default: trb opd offline_kd
"""

import json
import shutil
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
methods = sys.argv[1:] or ["trb", "opd", "offline_kd"]
rows = []
for m in methods:
    run_dir = ROOT / "outputs" / "demo_check" / m
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own scratch run (a finished run dir is never reused)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "trb_exp.train", f"method={m}", "logger=none", f"hydra.run.dir={run_dir}"],
                   check=True, cwd=ROOT)
    wall = time.time() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # max over children so far
    s = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    blend = [r for r in metrics if "trb/beta_mean" in r and r.get("trb/eps", 0) > 0]
    rows.append({
        "method": m, "wall_s": round(wall, 1), "train_s": s["train_s"], "peak_rss_mb": s["peak_rss_mb"],
        "pass1_0": s["initial"]["eval/pass@1"], "pass1_T": s["final"]["eval/pass@1"],
        "greedy_0": s["initial"]["eval/greedy_acc"], "greedy_T": s["final"]["eval/greedy_acc"],
        "beta_warmup": sum(r["trb/beta_mean"] for r in blend) / len(blend) if blend else None,
    })
lines = ["| method | wall (s) | train (s) | peak RSS (MB) | pass@1 start → end | gain (points) | greedy start → end | mean beta in warmup |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    beta = "—" if r["beta_warmup"] is None else f"{r['beta_warmup']:.2f}"
    lines.append(f"| {r['method']} | {r['wall_s']} | {r['train_s']} | {r['peak_rss_mb']} | {r['pass1_0']:.3f} → {r['pass1_T']:.3f} "
                 f"| {100 * (r['pass1_T'] - r['pass1_0']):+.1f} | {r['greedy_0']:.3f} → {r['greedy_T']:.3f} | {beta} |")
table = "\n".join(lines)
print(table)
out = ROOT / "docs" / "demo_results.md"
out.write_text("# First-run numbers on the embedded default\n\n"
               "Measured with `python scripts/demo_check.py` on a 2-core CPU (no GPU), defaults of `conf/config.yaml`, "
               "`logger=none`, one method after another on an otherwise idle machine. pass@1 = mean over the 200 test "
               "problems of c/n with n=4 samples at temperature 1; wall time includes start-up, model loading and the 5 "
               "evaluations.\n\n" + table + "\n")
