"""The compute-matched view of a study: pass@1 against cumulative training time as well as against steps.

    python scripts/compute_matched.py RUNS_ROOT --out DIR [--title T]

RUNS_ROOT holds ``<setting>/<arm>/seed_<s>/`` run directories (metrics.jsonl + summary.json), as the powered
and the generalisation studies commit them. Per setting and arm, over the finished seeds: the mean test
pass@1 at each evaluated step, placed at the step and at the median cumulative training minutes up to that
step (the sum of the logged ``time/step_s``: training steps only, evaluations and a warm start before step 1,
such as sft_warmup's, excluded). Writes
``compute_matched.png`` and ``compute_matched.md`` (a table of minutes per run and the ratio to OPD's)
into DIR. The times were measured on a shared 2-core machine, one torch thread per run: indicative.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def curve(run_dir: Path) -> dict[int, tuple[float, float]] | None:
    """step -> (pass@1, cumulative training seconds) of a finished run; None for an unfinished one."""
    if not (run_dir / "summary.json").is_file():
        return None
    out, t = {}, 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            t += float(row.get("time/step_s", 0.0))
        if "eval/pass@1" in row:
            out[int(row["step"])] = (float(row["eval/pass@1"]), t)
    return out


def collect(root: Path) -> dict[str, dict[str, list[dict]]]:
    runs: dict = {}
    for d in sorted(root.glob("*/*/seed_*")):
        if d.is_dir() and (c := curve(d)) is not None:
            runs.setdefault(d.parent.parent.name, {}).setdefault(d.parent.name, []).append(c)
    return runs


def mean_curve(curves: list[dict]) -> tuple[list[int], list[float], list[float]]:
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return (steps, [sum(c[s][0] for c in curves) / len(curves) for s in steps],
            [statistics.median(c[s][1] for c in curves) / 60 for s in steps])  # median: a slowed run is an outlier


def table(runs: dict) -> list[str]:
    L = ["| setting | arm | runs | training minutes per run (median) | × OPD |", "|---|---|---|---|---|"]
    for s, arms in runs.items():
        base = statistics.median(c[max(c)][1] for c in arms["opd"]) if "opd" in arms else None
        for a, curves in arms.items():
            m = statistics.median(c[max(c)][1] for c in curves)
            L.append(f"| {s} | {a} | {len(curves)} | {m / 60:.2f} | " + (f"{m / base:.2f}" if base else "—") + " |")
    return L


def plot(runs: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    from trb_exp.analysis.plots import save_png

    fig = Figure(figsize=(5 * len(runs), 7), layout="constrained")
    axes = fig.subplots(2, len(runs), squeeze=False)
    for j, (s, arms) in enumerate(runs.items()):
        for a, curves in arms.items():
            steps, p, minutes = mean_curve(curves)
            kw = dict(marker="o", ms=3, lw=2 if a in ("opd", "trb") else 1.2, label=f"{a} ({len(curves)})")
            axes[0][j].plot(steps, p, **kw)
            axes[1][j].plot(minutes, p, **kw)
        axes[0][j].set_title(f"{title}: {s}", fontsize=9)
        axes[0][j].set_xlabel("step")
        axes[1][j].set_xlabel("cumulative training minutes (one thread, shared machine)")
        axes[0][j].legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("test pass@1 (mean over seeds)")
    save_png(fig, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    runs = collect(a.root)
    if not runs:
        raise SystemExit(f"error: {a.root}: no finished run under <setting>/<arm>/seed_<s>/")
    a.out.mkdir(parents=True, exist_ok=True)
    plot(runs, a.out / "compute_matched.png", a.title)
    cmd = "python scripts/compute_matched.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (a.out / "compute_matched.md").write_text(
        "# Compute-matched view\n\nPass@1 against steps and against cumulative training minutes "
        "(`compute_matched.png`); the training minutes of a run are the sum of its logged `time/step_s` "
        "(evaluations and a warm start before step 1, such as sft_warmup's, excluded), median over seeds, one torch "
        "thread on a shared 2-core machine: indicative.\n\n"
        + "\n".join(table(runs)) + f"\n\n![compute-matched](compute_matched.png)\n\n---\n`{cmd}`\n")
    print(f"[compute_matched] {a.out / 'compute_matched.md'}")


if __name__ == "__main__":
    main()
