#!/usr/bin/env python3
"""Plot every KL-budget schedule of trb_exp.schedules in one figure.

    python bench/plot_schedules.py                      # produces docs/schedules.png (the README's figure)
    python bench/plot_schedules.py --eps0 0.02 --warmup-steps 50 --steps 120 --out /tmp/s.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trb_exp.schedules import SCHEDULES, budget_at  # noqa: E402

FORMULAS = {
    "linear": r"$\epsilon_0(1-k/K)$",
    "cosine": r"$\epsilon_0(1+\cos(\pi k/K))/2$",
    "exponential": r"$\epsilon_0 r^{k/K}$",
    "step": r"$\epsilon_0$",
    "constant": r"$\epsilon_0$ (never annealed)",
    "none": r"$0$ (plain OPD)",
}
COLORS = {"linear": "C0", "cosine": "C1", "exponential": "C2", "step": "C3", "constant": "C4", "none": "0.2"}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps0", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=25, help="the horizon K")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--final-ratio", type=float, default=0.01, help="exponential: r")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "schedules.png")
    a = ap.parse_args(argv)

    steps = list(range(a.steps))
    curves = {n: [budget_at(k, n, a.eps0, a.warmup_steps, a.final_ratio) for k in steps] for n in SCHEDULES}
    # one panel per schedule (the others faint grey behind it): no two curves hide each other
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6), dpi=120, sharex=True, sharey=True)
    for ax, name in zip(axes.flat, SCHEDULES):
        for other, ys in curves.items():
            if other != name:
                ax.step(steps, ys, where="post", color="0.82", lw=1.2)
        ax.step(steps, curves[name], where="post", lw=2.4, color=COLORS[name])
        ax.axvline(a.warmup_steps, color="k", lw=0.8, ls=":", alpha=0.7)
        ax.set_title(f"{name}:  {FORMULAS[name]}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xlim(0, a.steps - 1)
        ax.set_ylim(-0.04 * a.eps0, 1.08 * a.eps0)
    for ax in axes[1]:
        ax.set_xlabel("training step k")
    for ax in axes[:, 0]:
        ax.set_ylabel(r"budget $\epsilon_k$")
    axes[0, 0].annotate(f"K = {a.warmup_steps}", (a.warmup_steps, 0.75 * a.eps0), xytext=(4, 0),
                        textcoords="offset points", fontsize=8)
    fig.suptitle(rf"KL-budget schedules: $\epsilon_0$ = {a.eps0}, K = {a.warmup_steps}, exponential r = "
                 rf"{a.final_ratio}.  Budget in nats/token (absolute) or fraction of KL($\pi_T\|\pi_S$) "
                 "(relative); 0 = plain OPD.", fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out)
    print(f"wrote {a.out}")
    return a.out


if __name__ == "__main__":
    main()
