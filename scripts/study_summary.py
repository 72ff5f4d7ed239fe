"""The miniature study's cross-setting table (docs/results/mini/README.md), from the committed runs.

    python scripts/study_summary.py [docs/results/mini]

Per family, the configuration selected on mini_a (its headline configuration: the one with the most
seeds): final pass@1 mean ± 95% CI and the paired per-seed difference to OPD on each setting; the
paired difference pooled over the five runs per family that took no part in selecting a configuration
(mini_a seeds 1-2, mini_b seeds 0-2); and the paper's protocol on the mini_a sweep (best checkpoint of
any configuration and evaluated step).
"""

from __future__ import annotations

import sys
from pathlib import Path

from trb_exp.compare import (find_run_dirs, group_runs, headline_config, headline_finals, load_run, mean_ci,
                             paired_difference)

FAMILIES = ("opd", "trb", "fixed_blend", "skd", "veto", "temp_warmup", "sft_warmup")
UNSELECTED = {"mini_a": {1, 2}, "mini_b": {0, 1, 2}}  # seed 0 of mini_a chose every configuration


def load(root: Path) -> dict:
    runs = [load_run(p, str(p.relative_to(root.resolve()))) for p in find_run_dirs([root])]
    return group_runs([r for r in runs if r.summary is not None and r.evals])


def _ci(mean, half, signed=False) -> str:
    m = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return m if half is None else f"{m} ± {half:.3f}"


def main(root: Path) -> None:
    settings = {name: load(root / name / "runs") for name in ("mini_a", "mini_b")}
    print("| family | config (selected on mini_a, seed 0) | mini_a final (seeds 0-2) | − OPD, paired | "
          "mini_b final (seeds 0-2) | − OPD, paired | − OPD, the 5 unselected pairs | paper protocol, mini_a sweep |")
    print("|---|---|---|---|---|---|---|---|")
    for fam in FAMILIES:
        cells, pooled = [], []
        for name, groups in settings.items():
            f, o = headline_finals(groups[fam]), headline_finals(groups["opd"])
            m, h, _ = mean_ci(list(f.values()))
            d = paired_difference(f, o)
            cells += [_ci(m, h), "—" if fam == "opd" else _ci(d["mean"], d["half"], signed=True)]
            pooled += paired_difference(headline_finals(groups[fam], UNSELECTED[name]),
                                        headline_finals(groups["opd"], UNSELECTED[name]))["diffs"]
        pm, ph, pn = mean_ci(pooled)
        best = max(r.pass1(s) for rs in settings["mini_a"][fam].values() for r in rs for s in r.evals if s > 0)
        label = headline_config(settings["mini_a"][fam])
        print(f"| {fam} | `{label}` | {' | '.join(cells)} | "
              f"{'—' if fam == 'opd' else _ci(pm, ph, signed=True) + f' (n={pn})'} | {best:.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/mini"))
