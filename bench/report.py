#!/usr/bin/env python3
"""Render docs/numbers.md, the project's measured numbers in one page, from the committed outputs of the
benchmarks in bench/ (their docs and JSON files) and of ``python -m trb_exp.prepare``. It re-runs nothing:
to update a number, re-run the command named next to it (it rewrites its doc), then this script.

    python bench/report.py              # writes docs/numbers.md
    python bench/report.py --check      # exit 1 if docs/numbers.md is not what the committed outputs render

Produces docs/numbers.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
OUT = DOCS / "numbers.md"


def md_tables(path: Path) -> list[list[dict[str, str]]]:
    """Every markdown table of a file, as lists of rows keyed by the header's cells."""
    tables, header, rows = [], None, []
    for line in path.read_text().splitlines() + [""]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            if header is not None:
                tables.append(rows)
            header, rows = None, []
        elif header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            rows.append(dict(zip(header, cells)))
    return tables


def bold(cell: str) -> str:
    """The bold figure of a cell such as ``**0.99×** [0.93, 1.05]``, with its bracket if any."""
    m = re.search(r"\*\*([^*]+)\*\*\s*(\[[^\]]+\])?", cell)
    return cell if m is None else " ".join(x for x in m.groups() if x)


def rel(path: Path) -> str:
    return f"[{path.relative_to(REPO)}]({path.relative_to(DOCS) if path.is_relative_to(DOCS) else '../' + str(path.relative_to(REPO))})"


def pair_section() -> list[str]:
    lines = ["## The embedded pairs", "",
             "Command: `python -m trb_exp.prepare` (pair a, `model=embedded`) and `python -m trb_exp.prepare --pair b` "
             "(`model=embedded_b`); they write the pair and its `prepare.json`, read here. Sampled pass@1: n = 8 at "
             "temperature 1 on the 200 test problems.", "",
             "| pair | model | layers × width | parameters | sampled pass@1 | greedy | build time (s) |",
             "|---|---|---|---|---|---|---|"]
    for pair, folder in (("a", "embedded"), ("b", "embedded_b")):
        path = REPO / "trb_exp" / "assets" / folder / "prepare.json"
        d = json.loads(path.read_text())
        for role in ("teacher", "student"):
            sp, m = d["spec"][role], d[role]
            lines.append(f"| {pair} ({rel(path)}) | {role} | {sp['layers']} × {sp['hidden']} | {m['params']:,} | "
                         f"{m['eval']['pass@1']:.3f} | {m['eval']['greedy_acc']:.3f} | {d['seconds']:,.0f} |")
    return lines + [""]


def default_run_section() -> list[str]:
    path = DOCS / "demo_results.json"
    lines = ["## The default run", ""]
    if not path.exists():
        return lines + ["Not measured on the current code: run `python bench/demo_check.py trb`.", ""]
    d = json.loads(path.read_text())
    lines += [f"Command: `{d['command']}`, which runs `python -m trb_exp.train method=<m> logger=none` (the README's "
              f"default run for `trb`; `schedule=linear` is the default schedule) and writes {rel(DOCS / 'demo_results.md')}. "
              "The metrics are seeded and do not depend on the machine's load; the times do "
              f"(1-minute load average {d['load_1min'][0]:.1f} at the start).", "",
              "| method | pass@1 start → end | greedy start → end | train s | peak RSS MB |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| `{r['method']}` | {r['pass1_0']:.3f} → {r['pass1_T']:.3f} | {r['greedy_0']:.3f} → "
                     f"{r['greedy_T']:.3f} | {r['train_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return lines + [""]


def engine_section() -> list[str]:
    path = DOCS / "engine_cpu_steps.json"
    d = json.loads(path.read_text())
    med = d["median"]
    return ["## The rollout engine on CPU", "",
            f"Command: `python bench/bench_engine_steps.py --steps {d['steps']} --out docs/engine_cpu_steps.md` "
            f"({rel(DOCS / 'engine_cpu_steps.md')}; paired training steps of the embedded default, one torch thread, "
            f"medians of {d['steps'] - d['skip']} steps).", "",
            "| quantity | value |", "|---|---|",
            f"| OPD decode time, static / eager engine | {d['opd_decode_static_over_eager']:.2f} |",
            f"| TRB decode time, static / eager engine | {d['trb_decode_static_over_eager']:.2f} |",
            f"| TRB warmup step / OPD step, static engine | {d['trb_over_opd_step']['static']:.2f} |",
            f"| TRB warmup step / OPD step, eager engine | {d['trb_over_opd_step']['eager']:.2f} |",
            f"| OPD step, static engine (s) | {med['opd/static']['step_s']:.3f} |",
            f"| TRB warmup step, static engine (s); of which the solver | {med['trb/static']['step_s']:.3f}; "
            f"{med['trb/static']['rule_s']:.3f} |", ""]


def overhead_section() -> list[str]:
    path = DOCS / "trb_overhead.md"
    text = path.read_text()
    rows = md_tables(path)[0]
    cmd = re.search(r"Generated by `([^`]+)`", text).group(1)
    step = [r for r in rows if r["metric"] == "step time"]
    noise = next((r for r in rows if r["phase"] == "noise reference"), None)
    checks = re.findall(r"^- (PASS|FAIL): ", text, flags=re.M)
    note = re.search(r"^Note: (.*)$", text, flags=re.M)
    return ["## TRB against OPD over whole runs", "",
            f"Command: `{cmd}` ({rel(path)}: two CLI runs of the embedded default, 2K steps each, one after the "
            "other).", "",
            "| quantity | value |", "|---|---|",
            *[f"| TRB step / OPD step, {r['phase']} [95% CI] | {bold(r['TRB / OPD'])} |" for r in step],
            *([f"| OPD against itself (the timing noise: k ≥ K over k < K) | {noise['OPD']} |"] if noise else []),
            f"| checks passed (budget held every step, exactly 0 from K on, no teacher in the loop after K) | "
            f"{checks.count('PASS')} of {len(checks)} |", "",
            *([f"Note from the doc: {note.group(1)}", ""] if note else [])]


def solver_section() -> list[str]:
    path = DOCS / "solver_benchmark.md"
    rows = md_tables(path)[0]
    cmd = re.search(r"Command: `([^`]+)`", path.read_text()).group(1)
    newton = [float(r["Newton iters mean / max"].split(" / ")[0]) for r in rows]
    speed = [float(r["speed-up"].rstrip("x")) for r in rows]
    big = [r for r in rows if r["V"] == max(rows, key=lambda r: int(r["V"]))["V"]]
    return ["## The solver", "",
            f"Command: `{cmd}` ({rel(path)}: Newton against bisection, same tolerance, one thread).", "",
            "| quantity | value |", "|---|---|",
            f"| Newton iterations per solved row, mean (range over the {len(rows)} cells) | {min(newton):.2f}–{max(newton):.2f} |",
            "| bisection iterations per row | 20 |",
            f"| end-to-end speed-up over bisection, all cells | {min(speed):.1f}–{max(speed):.1f}× |",
            f"| the same at V = {int(big[0]['V']):,} | {min(float(r['speed-up'].rstrip('x')) for r in big):.1f}–"
            f"{max(float(r['speed-up'].rstrip('x')) for r in big):.1f}× |", ""]


def launcher_section() -> list[str]:
    path = DOCS / "launcher_speedup.md"
    rows = md_tables(path)[0]
    cmd = re.search(r"Command: `([^`]+)`", path.read_text()).group(1)
    jobs = next(k for k in rows[0] if k.startswith("joblib"))
    return ["## Sweeps on the joblib launcher", "",
            f"Command: `{cmd}` ({rel(path)}: a 4-job multirun of the embedded default, joblib against Hydra's basic "
            "launcher).", "",
            f"| steps per job | basic launcher (s) | {jobs} | ratio |", "|---|---|---|---|",
            *[f"| {r['steps per job']} | {r['basic launcher (s)']} | {r[jobs]} | {r['ratio']} |" for r in rows], ""]


def trl_section() -> list[str]:
    path = DOCS / "trl_overhead.md"
    tables = md_tables(path)
    cmd = re.search(r"^`([^`]+)`", path.read_text(), flags=re.M).group(1)
    wall, cpu = tables[0], tables[1]
    return ["## TRB inside TRL", "",
            f"Command: `{cmd}` ({rel(path)}: `TRBDistillationTrainer` against TRL's `DistillationTrainer` in one "
            "process, embedded pair).", "",
            "| phase | TRB step / plain step, wall (per-repeat median [min, max]) | the same, process CPU time |",
            "|---|---|---|",
            *[f"| {w['phase']} | {w['per-repeat ratio, median [min, max]']} | {c['per-repeat ratio, median [min, max]']} |"
              for w, c in zip(wall, cpu)], ""]


def mutation_section() -> list[str]:
    path = DOCS / "mutation_check.md"
    text = path.read_text()
    cmd = re.search(r"Command: `([^`]+)`", text).group(1)
    killed = re.search(r"(\d+) of (\d+) mutants killed", text)
    return ["## Do the tests notice a bug?", "",
            f"Command: `{cmd}` ({rel(path)}: deliberate bugs applied to a copy of the code, a fast test selection run "
            "against each).", "",
            f"Mutants killed: **{killed.group(1)} of {killed.group(2)}**.", ""]


SECTIONS = [pair_section, default_run_section, engine_section, overhead_section, solver_section, launcher_section,
            trl_section, mutation_section]


def render() -> str:
    lines = ["# Measured numbers", "",
             "Rendered by `python bench/report.py` from the committed outputs of the benchmarks (it re-runs nothing; "
             "`bench/README.md` lists them). Each number comes with the command that measures it and the doc that "
             "holds the full table, the machine and its load. Times were taken on a shared 2-core CPU unless the doc "
             "says otherwise: compare ratios measured within one command, not times across docs.", ""]
    for section in SECTIONS:
        lines += section()
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with docs/numbers.md instead of writing it")
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        ok = OUT.exists() and OUT.read_text() == text
        print("docs/numbers.md is up to date" if ok else "docs/numbers.md is stale: run python bench/report.py")
        return 0 if ok else 1
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
