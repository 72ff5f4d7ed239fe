"""The embedded default's first-run numbers, as a user gets them: for each method, run the embedded default
through the CLI (``python -m trb_exp.train method=<m> logger=none``) and tabulate wall time, training time,
peak memory and pass@1 / greedy accuracy before and after training.

    python bench/demo_check.py [method ...]        # default: trb opd offline_kd

Produces docs/demo_results.md (and docs/demo_results.json). Wall times depend on the machine and its load (the doc records the load
average); the metrics of a method do not (one torch thread, seeded).
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "demo_results.md"  # and its rows as docs/demo_results.json (read by bench/report.py)
HEADER = ["| method | wall (s) | train (s) | peak RSS (MB) | pass@1 start → end | gain (points) | greedy start → end "
          "| mean beta in warmup |", "|---|---|---|---|---|---|---|---|"]


def run_one(method: str) -> dict:
    """One default run of ``method`` in this script's own scratch directory; its summary numbers."""
    run_dir = ROOT / "outputs" / "demo_check" / method
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own scratch run (a finished run dir is never reused)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "trb_exp.train", f"method={method}", "logger=none",
                    f"hydra.run.dir={run_dir}"], check=True, cwd=ROOT)
    wall = time.time() - t0
    s = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    blend = [r for r in metrics if "trb/beta_mean" in r and r.get("trb/eps", 0) > 0]
    return {
        "method": method, "wall_s": round(wall, 1), "train_s": s["train_s"], "peak_rss_mb": s["peak_rss_mb"],
        "pass1_0": s["initial"]["eval/pass@1"], "pass1_T": s["final"]["eval/pass@1"],
        "greedy_0": s["initial"]["eval/greedy_acc"], "greedy_T": s["final"]["eval/greedy_acc"],
        "beta_warmup": sum(r["trb/beta_mean"] for r in blend) / len(blend) if blend else None,
    }


def table(rows: list[dict]) -> str:
    lines = list(HEADER)
    for r in rows:
        beta = "—" if r["beta_warmup"] is None else f"{r['beta_warmup']:.2f}"
        lines.append(f"| {r['method']} | {r['wall_s']} | {r['train_s']} | {r['peak_rss_mb']} | {r['pass1_0']:.3f} → "
                     f"{r['pass1_T']:.3f} | {100 * (r['pass1_T'] - r['pass1_0']):+.1f} | {r['greedy_0']:.3f} → "
                     f"{r['greedy_T']:.3f} | {beta} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    methods = argv or ["trb", "opd", "offline_kd"]
    load0 = os.getloadavg()[0]
    rows = [run_one(m) for m in methods]
    load1 = os.getloadavg()[0]
    text = table(rows)
    print(text)
    cmd = ("python bench/demo_check.py " + " ".join(argv)).strip()
    OUT.write_text(
        "# First-run numbers on the embedded default\n\n"
        f"Measured with `{cmd}` on {time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} CPUs, "
        "defaults of `conf/config.yaml`, `logger=none`, one method after another; 1-minute load average "
        f"{load0:.1f} before and {load1:.1f} after (wall and train times scale with the load; the metrics do not). "
        "pass@1 = mean over the 200 test problems of c/n with n=4 samples at temperature 1; wall time includes "
        "start-up, model loading and the 5 evaluations.\n\n" + text + "\n")
    OUT.with_suffix(".json").write_text(json.dumps({"command": cmd, "load_1min": [load0, load1], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
