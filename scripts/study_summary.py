"""The miniature study's cross-setting table (docs/results/mini/README.md), from the committed runs.

    python scripts/study_summary.py [docs/results/mini] [--baseline opd] [--order trb,fixed_blend,...]

Each setting's runs are ``<root>/<setting>/runs.jsonl.gz`` (a data file) or, where there is none, the run
directories under ``<root>/<setting>/runs``.

Its rows: the families present in every setting, the baseline first, then in ``--order`` (the committed
table's order by default; the runs alone do not give it), then any other alphabetically. Per family, the
configuration selected on mini_a (its headline configuration: the one with the most
seeds): final pass@1 mean ± 95% CI and the paired per-seed difference to the baseline (OPD) on each setting; the
paired difference pooled over the five runs per family that took no part in selecting a configuration
(mini_a seeds 1-2, mini_b seeds 0-2); and the paper's protocol on the mini_a sweep (best checkpoint of
any configuration and evaluated step).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trb_exp.compare import group_runs, headline_config, headline_finals, load_runs, mean_ci, paired_difference

ORDER = "trb,fixed_blend,skd,veto,temp_warmup,sft_warmup"  # the committed table's row order (after the baseline)
UNSELECTED = {"mini_a": {1, 2}, "mini_b": {0, 1, 2}}  # seed 0 of mini_a chose every configuration


def load(source: Path) -> dict:
    """The finished runs of ``source`` (a data file or a directory of runs), grouped."""
    return group_runs([r for r in load_runs([source]) if r.summary is not None and r.evals])


def setting_runs(root: Path, name: str) -> Path:
    """A setting's runs: its data file, else its run directories."""
    data = root / name / "runs.jsonl.gz"
    return data if data.is_file() else root / name / "runs"


def _ci(mean, half, signed=False) -> str:
    m = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return m if half is None else f"{m} ± {half:.3f}"


def families(settings: dict, baseline: str, order) -> list[str]:
    """The families present in every setting: the baseline, then those named in ``order``, then the rest
    alphabetically."""
    present = set.intersection(*(set(groups) for groups in settings.values()))
    if baseline not in present:
        raise SystemExit(f"error: --baseline {baseline}: not a family of every setting ({', '.join(sorted(present))})")
    rank = {fam: i for i, fam in enumerate(order)}
    return [baseline] + sorted(present - {baseline}, key=lambda f: (rank.get(f, len(rank)), f))


def main(root: Path, baseline: str = "opd", order=tuple(ORDER.split(","))) -> None:
    settings = {name: load(setting_runs(root, name)) for name in ("mini_a", "mini_b")}
    B = baseline.upper()
    print(f"| family | config (selected on mini_a, seed 0) | mini_a final (seeds 0-2) | − {B}, paired | "
          f"mini_b final (seeds 0-2) | − {B}, paired | − {B}, the 5 unselected pairs | paper protocol, mini_a sweep |")
    print("|---|---|---|---|---|---|---|---|")
    for fam in families(settings, baseline, order):
        cells, pooled = [], []
        for name, groups in settings.items():
            f, o = headline_finals(groups[fam]), headline_finals(groups[baseline])
            m, h, _ = mean_ci(list(f.values()))
            d = paired_difference(f, o)
            cells += [_ci(m, h), "—" if fam == baseline else _ci(d["mean"], d["half"], signed=True)]
            pooled += paired_difference(headline_finals(groups[fam], UNSELECTED[name]),
                                        headline_finals(groups[baseline], UNSELECTED[name]))["diffs"]
        pm, ph, pn = mean_ci(pooled)
        best = max(r.pass1(s) for rs in settings["mini_a"][fam].values() for r in rs for s in r.evals if s > 0)
        label = headline_config(settings["mini_a"][fam])
        print(f"| {fam} | `{label}` | {' | '.join(cells)} | "
              f"{'—' if fam == baseline else _ci(pm, ph, signed=True) + f' (n={pn})'} | {best:.3f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python scripts/study_summary.py", description=__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", default="docs/results/mini",
                   help="the study (mini_a/runs.jsonl.gz or mini_a/runs/, the same for mini_b)")
    p.add_argument("--baseline", default="opd", help="the family every other is paired against (first row)")
    p.add_argument("--order", default=ORDER, help="comma list: the other rows' order (others follow alphabetically)")
    a = p.parse_args()
    main(Path(a.root), a.baseline, tuple(x for x in a.order.split(",") if x))
