"""Pick each method family's best configuration from a sweep, for the seeded stage of a study.

    python scripts/select_best.py SWEEP_ROOT [--seeds 0] [--on val|test] [--score final|auc]

Reads the runs of SWEEP_ROOT, a directory of runs or a data file (as ``trb_exp.compare`` does), and prints one line per family:
``<family> <overrides>``, where the overrides re-create that family's configuration with the highest
score on the VALIDATION split (``val/pass@1``, ``dataset.val_size``) by default, averaged over the
runs of ``--seeds`` (ties: the first in sorted config order). ``--score final``: pass@1 at the final
step; ``auc``: the mean pass@1 over training (trapezoid over the evaluated steps). ``--on test`` selects
on the test split instead (what the project did before it had a validation split: optimistic). One line
per family on stderr gives the selected configuration's score on the selection split and, beside it,
its test score (the number to report). The overrides are the run's own command-line overrides minus
seed, sweep preset and hydra keys, plus ``method=<family>``: append ``seed=1,2,3`` to re-run the
configuration on fresh seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from trb_exp.compare import InputError, group_runs, load_runs

_DROP = ("seed=", "sweep=", "hydra.", "logger=", "experiment=", "trainer.resume=", "trainer.progress=",
         "trainer.checkpoint_every=", "trainer.keep_checkpoints=")
SPLITS = {"val": "val/pass@1", "test": "eval/pass@1"}


class Selection(NamedTuple):
    label: str  # the configuration's label (compare's grouping)
    score: float  # on the selection split, mean over the selection seeds
    test: float  # the same score on the test split: what the selected configuration reports
    overrides: list[str]


def score_of(run, key: str, score: str) -> float:
    """``final``: the value of ``key`` at the last evaluated step; ``auc``: its trapezoid mean over the steps."""
    steps = sorted(s for s in run.evals if key in run.evals[s])
    if not steps:
        raise InputError(f"error: {run.path}: no {key} logged (a run from before the validation split?); "
                         "select with --on test, or re-run the sweep")
    vals = [float(run.evals[s][key]) for s in steps]
    if score == "final" or len(steps) < 2:
        return vals[-1]
    area = sum((a + b) / 2 * (t1 - t0) for a, b, t0, t1 in zip(vals, vals[1:], steps, steps[1:]))
    return area / (steps[-1] - steps[0])


def select(root: Path, seeds=(0,), on: str = "val", score: str = "final") -> dict[str, Selection]:
    """{family: Selection} of each family's best configuration on split ``on`` over ``seeds``."""
    runs = load_runs([root])
    best = {}
    for fam, configs in group_runs(runs).items():
        scored = []
        for label, rs in configs.items():
            picked = [r for r in rs if r.seed in set(seeds) and r.evals]
            if not picked:
                continue
            mean = lambda key: sum(score_of(r, key, score) for r in picked) / len(picked)
            scored.append((-mean(SPLITS[on]), label, picked[0], mean(SPLITS["test"])))
        if not scored:
            continue
        neg, label, r, test = min(scored, key=lambda t: t[:2])
        overrides = [o for o in r.overrides if not o.startswith(_DROP)]
        best[fam] = Selection(label, -neg, test,
                              [f"method={fam}", *sorted(o for o in overrides if not o.startswith("method="))])
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--seeds", default="0", help="comma list: the selection seeds, averaged (default 0)")
    ap.add_argument("--seed", type=int, default=None, help="one selection seed (the older spelling of --seeds)")
    ap.add_argument("--on", choices=sorted(SPLITS), default="val", help="the selection split (default val)")
    ap.add_argument("--score", choices=("final", "auc"), default="final", help="final pass@1 or its mean over training")
    args = ap.parse_args(argv)
    try:
        seeds = (args.seed,) if args.seed is not None else tuple(int(x) for x in args.seeds.split(","))
    except ValueError:
        ap.error(f"--seeds={args.seeds!r}: give integers separated by commas, e.g. 0,1")
    for fam, sel in select(args.root, seeds, args.on, args.score).items():
        print(fam, " ".join(sel.overrides))
        print(f"[select] {fam}: {sel.label}: {args.on} {args.score} pass@1 {sel.score:.4f} (seeds "
              f"{','.join(map(str, seeds))}); its test {args.score} pass@1 {sel.test:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
