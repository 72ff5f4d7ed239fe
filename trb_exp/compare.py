"""Compare training runs: ``python -m trb_exp.compare RUNS... [--out DIR] [--target-frac 0.8]
[--teacher-pass1 X] [--ci-seeds 1,2] [--paper docs/results/paper_table1.json] [--title T]
[--focus trb] [--baseline opd]``.

RUNS are run directories or data files. Every subdirectory of a directory holding ``metrics.jsonl`` and
``.hydra/config.yaml`` is a run (a multirun sweep dir works as is); a data file (``runs.jsonl.gz``,
written by ``python -m trb_exp.analysis.runstore pack``) holds a study's runs. Runs are grouped by method
family (``method.name``) and by configuration (the method's knobs, the schedule's for a run that logged a
budget, and any other setting that varies within the family; never the seed). The report's roles are arguments: ``--focus`` (the
subject family, trb by default) and ``--baseline`` (the family every other is paired against, opd).
Writes ``comparison.md`` (deterministic: re-running on the same runs reproduces it byte for byte) and
PNG plots next to it:

- the paper's Table 1 protocol: per family, the best checkpoint (highest ``eval/pass@1``) over every
  evaluated step (> 0) of every run of every configuration, with its per-benchmark pass@1;
- per configuration with >= 2 seeds: mean ± 95% CI (Student t) of pass@1 at the final step and at the
  end of the focus's warmup, and the paired per-seed difference focus − baseline with its 95% CI;
- steps-to-target (``--teacher-pass1``): the first evaluated step reaching target_frac × teacher pass@1;
- wall-clock per run and mean step time during and after warmup;
- a summary (each family's headline configuration against the baseline), a sweeps table, every family −
  baseline, the paper's own Table 1 (``--paper``), and the plots headline_curves (against steps and, as
  headline_curves_wall, against training minutes) / learning_curves /
  sweeps / trb_diagnostics. Unfinished runs (no summary.json) are left out; the last line names the command.

The maths (``mean_ci``, ``paired_difference``, ``best_checkpoint``, ``steps_to_target``) are pure
functions.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from trb_exp.analysis.plots import plot_headline_curves, plot_learning_curves, plot_sweeps, plot_trb_diagnostics
from trb_exp.analysis.report import Roles, build_report, render_paper_table
from trb_exp.analysis.runs import (PASS1, InputError, Run, find_run_dirs, group_runs, headline_config, headline_finals,
                                   load_run, load_runs, seeded_groups)
from trb_exp.run.environment import bit_exact_mismatch
from trb_exp.analysis.stats import (best_checkpoint, closest_step, first_step_at_least, mean_ci, paired_difference,
                                    steps_to_target, t_quantile_975)

__all__ = ["PASS1", "InputError", "Roles", "Run", "best_checkpoint", "build_report", "closest_step", "compare",
           "find_run_dirs", "first_step_at_least", "group_runs", "headline_config", "headline_finals", "load_run",
           "load_runs", "main", "mean_ci", "paired_difference", "render_paper_table", "steps_to_target",
           "t_quantile_975"]


DEFAULT_ROLES = Roles(focus="trb", baseline="opd")  # the CLI's --focus / --baseline defaults


def compare(run_dirs, out: Path, *, target_frac: float = 0.8, teacher_pass1: float | None = None,
            ci_seeds=None, paper: dict | None = None, title: str = "Run comparison", command: str | None = None,
            roles: Roles | None = None) -> Path:
    roles = roles or DEFAULT_ROLES
    runs = load_runs(run_dirs)
    if not runs:
        raise InputError(f"error: no run (metrics.jsonl + .hydra/config.yaml) under {', '.join(map(str, run_dirs))}; "
                         "give run directories or a data file (runs.jsonl.gz)")
    unfinished = sum(r.summary is None for r in runs)
    if unfinished:
        print(f"[compare] skipping {unfinished} unfinished run(s) (no summary.json)", file=sys.stderr)
    runs = [r for r in runs if r.evals and r.summary is not None]
    if not runs:
        raise InputError("error: none of the runs has finished (summary.json) with an evaluation row")
    mismatch = bit_exact_mismatch([(r.summary or {}).get("env") for r in runs])
    if mismatch:
        print(f"[compare] {mismatch}", file=sys.stderr)
    groups = group_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    if plot_headline_curves(seeded_groups(groups, ci_seeds), out / "headline_curves.png", roles, teacher_pass1):
        plots["headline learning curves"] = "headline_curves.png"
    if plot_headline_curves(seeded_groups(groups, ci_seeds), out / "headline_curves_wall.png", roles, teacher_pass1,
                            x="minutes"):
        plots["headline learning curves against training minutes (compute-matched)"] = "headline_curves_wall.png"
    if plot_learning_curves(groups, out / "learning_curves.png"):
        plots["learning curves per configuration"] = "learning_curves.png"
    if plot_sweeps(groups, out / "sweeps.png", roles):
        plots["sweeps"] = "sweeps.png"
    if plot_trb_diagnostics(seeded_groups(groups, ci_seeds), out / "trb_diagnostics.png"):
        plots["TRB diagnostics"] = "trb_diagnostics.png"
    report = build_report(runs, groups, target_frac=target_frac, teacher_pass1=teacher_pass1, plots=plots,
                          roles=roles, ci_seeds=ci_seeds, paper=paper, title=title, command=command)
    path = out / "comparison.md"
    path.write_text(report)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m trb_exp.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUNS",
                   help="run dirs or multirun sweep dirs (searched recursively), or data files (runs.jsonl.gz)")
    p.add_argument("--out", default=None,
                   help="output dir (default: <common parent of RUNS (a data file: its folder)>/comparison)")
    p.add_argument("--target-frac", type=float, default=0.8, help="steps-to-target: fraction of the teacher")
    p.add_argument("--teacher-pass1", type=float, default=None, help="teacher pass@1 (else no steps-to-target)")
    p.add_argument("--ci-seeds", default=None,
                   help="comma list: the over-seeds sections use only these seeds (e.g. leave out the seed that "
                        "selected each family's configuration); default all")
    p.add_argument("--paper", default=None, help="JSON of the paper's published table, rendered next to ours")
    p.add_argument("--title", default="Run comparison", help="the report's title")
    p.add_argument("--focus", default=DEFAULT_ROLES.focus,
                   help="the report's subject family: its end of warmup is the reference step, it is paired "
                        "against the baseline per configuration (default %(default)s)")
    p.add_argument("--baseline", default=DEFAULT_ROLES.baseline,
                   help="the family every other one is paired against (default %(default)s)")
    a = p.parse_args(argv)
    ci_seeds = None
    if a.ci_seeds:
        try:
            ci_seeds = {int(x) for x in a.ci_seeds.split(",")}
        except ValueError:
            p.error(f"--ci-seeds={a.ci_seeds!r}: give integers separated by commas, e.g. 1,2,3")
    paper = None
    if a.paper:
        if not Path(a.paper).is_file():
            raise InputError(f"error: --paper {a.paper}: no such file (e.g. --paper docs/results/paper_table1.json)")
        try:
            paper = json.loads(Path(a.paper).read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"error: --paper {a.paper}: not valid JSON ({e.msg} at line {e.lineno})") from None
    dirs = [str(Path(d).resolve().parent if Path(d).is_file() else Path(d).resolve()) for d in a.run_dirs]
    out = a.out or str(Path(os.path.commonpath(dirs)) / "comparison")
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"error: --out {out}: a file is there; give a directory (it is created if missing)")
    command = "python -m trb_exp.compare " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    path = compare(a.run_dirs, Path(out), target_frac=a.target_frac, teacher_pass1=a.teacher_pass1,
                   ci_seeds=ci_seeds, paper=paper, title=a.title, command=command,
                   roles=Roles(focus=a.focus, baseline=a.baseline))
    print(f"[compare] wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
