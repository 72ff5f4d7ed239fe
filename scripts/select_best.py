"""Pick each method family's best configuration from a sweep, for the seeded stage of a study.

    python scripts/select_best.py SWEEP [--seed 0]

Reads the runs of SWEEP, a directory of runs or a data file (as ``trb_exp.compare`` does), and prints one
line per family: ``<family> <overrides>``, where the overrides re-create that family's configuration whose run with
``--seed`` has the highest pass@1 at the final step (ties: the first in sorted config order). The
overrides are the run's own command-line overrides minus seed, sweep preset and hydra keys, plus
``method=<family>``: append ``seed=1,2,3`` to re-run the configuration on fresh seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trb_exp.compare import group_runs, load_runs

_DROP = ("seed=", "sweep=", "hydra.", "logger=", "experiment=", "trainer.resume=", "trainer.progress=",
         "trainer.checkpoint_every=", "trainer.keep_checkpoints=")


def select(root: Path, seed: int = 0) -> dict[str, tuple[str, float, list[str]]]:
    """{family: (config label, final pass@1, overrides)} of each family's best configuration."""
    best = {}
    for fam, configs in group_runs(load_runs([root])).items():
        scored = []
        for label, rs in configs.items():
            r = next((r for r in rs if r.seed == seed), None)
            if r is None or not r.evals:
                continue
            scored.append((-r.pass1(max(r.evals)), label, r))
        if not scored:
            continue
        neg, label, r = min(scored, key=lambda t: t[:2])
        overrides = [o for o in r.overrides if not o.startswith(_DROP)]
        best[fam] = (label, -neg, [f"method={fam}", *sorted(o for o in overrides if not o.startswith("method="))])
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--seed", type=int, default=0, help="the selection seed (default 0)")
    args = ap.parse_args(argv)
    for fam, (_label, _score, overrides) in select(args.root, args.seed).items():
        print(fam, " ".join(overrides))


if __name__ == "__main__":
    main()
