"""The embedded default's first-run numbers, as a user gets them: for each method, run the embedded default
through the CLI (``python -m trb_exp.train method=<m> logger=none``) and tabulate wall time, training time,
peak memory and pass@1 / greedy accuracy before and after training.

    python bench/demo_check.py [method ...]        # default: trb opd offline_kd
    python bench/demo_check.py --rerender          # the doc again from its .json

Produces docs/demo_results.md (and docs/demo_results.json). Wall times depend on the machine and its load (the doc records the load
average); the metrics of a method do not (one torch thread, seeded).
"""

import json
import os
import platform
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


def cpu_name() -> str:
    """The CPU model: the metrics of a run can depend on it (floating-point rounding differs between CPUs and
    400 training steps amplify it), not on the machine's load."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def render(d: dict) -> str:
    """docs/demo_results.md from the JSON record of a measurement."""
    return ("# First-run numbers on the embedded default\n\n"
            f"Measured with `{d['command']}` on {d['date']}, {d['cpus']} CPUs ({d['cpu']}, torch CPU capability "
            f"{d['cpu_capability']}; torch {d['torch']}, transformers {d['transformers']}), defaults of `conf/config.yaml`, `logger=none`, one method after another; "
            f"1-minute load average {d['load_1min'][0]:.1f} before and {d['load_1min'][1]:.1f} after (wall and train "
            "times scale with the load; the metrics do not, but they depend on the CPU and the library versions: "
            "floating-point rounding differs between them and 400 training steps amplify it). pass@1 = mean over the 200 test problems of "
            "c/n with n=4 samples at temperature 1; wall time includes start-up, model loading and the 5 "
            "evaluations.\n\n" + table(d["rows"]) + "\n")


def main(argv: list[str]) -> None:
    if argv == ["--rerender"]:  # the doc again from docs/demo_results.json, no run
        OUT.write_text(render(json.loads(OUT.with_suffix(".json").read_text())))
        return
    import torch
    import transformers

    methods = argv or ["trb", "opd", "offline_kd"]
    load0 = os.getloadavg()[0]
    rows = [run_one(m) for m in methods]
    d = {"command": ("python bench/demo_check.py " + " ".join(argv)).strip(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
         "cpus": os.cpu_count(), "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
         "torch": torch.__version__, "transformers": transformers.__version__,
         "load_1min": [load0, os.getloadavg()[0]], "rows": rows}
    print(table(rows))
    OUT.with_suffix(".json").write_text(json.dumps(d, indent=1) + "\n")
    OUT.write_text(render(d))


if __name__ == "__main__":
    main(sys.argv[1:])
