"""The comparison's plots (PNG, deterministic bytes: no timestamp in the metadata)."""

from __future__ import annotations

from pathlib import Path
from statistics import median

from trb_exp.analysis.report import Roles
from trb_exp.analysis.runs import DIAGNOSTICS, fmt_value, headline_config, seed_curve, train_minutes_at_evals


def save_png(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _band(ax, curve, n_runs, xs=None, **kw):
    xs = list(curve) if xs is None else xs
    (line,) = ax.plot(xs, [sum(v) / len(v) for v in curve.values()], marker="o", ms=3, **kw)
    if n_runs > 1:
        ax.fill_between(xs, [min(v) for v in curve.values()], [max(v) for v in curve.values()],
                        color=line.get_color(), alpha=0.15)
    return line


def plot_headline_curves(sgroups, path: Path, roles: Roles, teacher_pass1: float | None = None,
                         x: str = "step") -> bool:
    """One axis: each family's headline configuration, seed mean with a min-max band (the focus's and
    the baseline's drawn thicker), against the step (``x="step"``) or against the training minutes spent by
    that step, median over seeds (``x="minutes"``: the compute-matched view, since a TRB warmup step costs
    more than an OPD step; runs without step times are left out of it)."""
    from matplotlib.figure import Figure

    series = []
    for fam, cfgs in sgroups.items():
        label = headline_config(cfgs)
        rs = [] if label is None else [r for r in cfgs[label] if x == "step" or train_minutes_at_evals(r)]
        if rs and seed_curve(rs):
            series.append((fam, rs))
    if not series:
        return False
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for fam, rs in series:
        curve = seed_curve(rs)
        minutes = [] if x == "step" else [train_minutes_at_evals(r) for r in rs]  # once per run
        xs = None if x == "step" else [median(m[s] for m in minutes) for s in curve]
        _band(ax, curve, len(rs), xs, label=f"{fam} (n={len(rs)})",
              lw=2.5 if fam in (roles.focus, roles.baseline) else 1.2)
    if teacher_pass1 is not None:
        ax.axhline(teacher_pass1, color="k", ls=":", lw=1, label=f"teacher {teacher_pass1:.3f}")
    ax.set_title("pass@1, each family's headline configuration: seed mean, band = min-max"
                 + ("" if x == "step" else ";\nx = training minutes by each evaluation (median over seeds, wall time "
                    "on the machine that ran them)"), fontsize=10)
    ax.set_xlabel("step" if x == "step" else "training minutes (sum of time/step_s)")
    ax.set_ylabel("pass@1")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, ncol=2)
    save_png(fig, path)
    return True


def plot_learning_curves(groups, path: Path) -> bool:
    """One panel per family (shared y axis), one line per configuration."""
    from matplotlib.figure import Figure

    fams = [f for f, cfgs in groups.items() if any(seed_curve(rs) for rs in cfgs.values())]
    if not fams:
        return False
    ncol = min(4, len(fams))
    nrow = (len(fams) + ncol - 1) // ncol
    fig = Figure(figsize=(4.5 * ncol, 3.6 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, fam in zip(axes, fams):
        for label, rs in groups[fam].items():
            curve = seed_curve(rs)
            if curve:
                _band(ax, curve, len(rs), label=f"{label} (n={len(rs)})"[:60], lw=1)
        ax.set_title(f"{fam}: pass@1 per configuration", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("pass@1")
        if len(groups[fam]) <= 6:
            ax.legend(fontsize=6)
    for ax in axes[len(fams):]:
        ax.set_visible(False)
    save_png(fig, path)
    return True


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def plot_sweeps(groups, path: Path, roles: Roles) -> bool:
    """The paper's Figs 5/6: per family with several configurations, the best-checkpoint pass@1 of each:
    a heatmap over two swept knobs, a line over one; the baseline's best checkpoint for reference."""
    from matplotlib.figure import Figure

    def best_of(rs):
        return max((r.pass1(s) for r in rs for s in r.evals if s > 0), default=None)

    opd_best = max((b for rs in groups.get(roles.baseline, {}).values() if (b := best_of(rs)) is not None), default=None)
    panels = []
    for fam, cfgs in groups.items():
        if len(cfgs) < 2:
            continue
        knobs = sorted({k for rs in cfgs.values() for k in rs[0].knobs
                        if len({repr(r.knobs.get(k)) for rs2 in cfgs.values() for r in rs2}) > 1})
        if 1 <= len(knobs) <= 2:
            panels.append((fam, knobs, {tuple(_num(rs[0].knobs.get(k)) for k in knobs): best_of(rs)
                                        for rs in cfgs.values()}))
    if not panels:
        return False
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig = Figure(figsize=(5.2 * ncol, 4.0 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    ref = f"{roles.B} best {opd_best:.3f}" if opd_best is not None else f"no {roles.B} run"
    for ax, (fam, knobs, vals) in zip(axes, panels):
        if len(knobs) == 2:
            xs = sorted({k[0] for k in vals}, key=str if any(isinstance(k[0], str) for k in vals) else None)
            ys = sorted({k[1] for k in vals}, key=str if any(isinstance(k[1], str) for k in vals) else None)
            grid = [[vals.get((x, y)) for x in xs] for y in ys]
            im = ax.imshow([[float("nan") if v is None else v for v in row] for row in grid], cmap="viridis",
                           origin="lower", aspect="auto")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if v is not None:
                        star = "*" if opd_best is not None and v > opd_best else ""
                        ax.text(j, i, f"{v:.2f}{star}", ha="center", va="center", fontsize=8,
                                color="k" if im.norm(v) > 0.5 else "w")
            ax.set_xticks(range(len(xs)), [fmt_value(x) for x in xs])
            ax.set_yticks(range(len(ys)), [fmt_value(y) for y in ys])
            ax.set_xlabel(knobs[0])
            ax.set_ylabel(knobs[1])
            fig.colorbar(im, ax=ax, shrink=0.8)
            ax.set_title(f"{fam}: best pass@1 ({ref}; * = above it)", fontsize=8)
        else:
            pts = sorted(vals.items(), key=lambda kv: (str(type(kv[0][0])), kv[0][0]))
            ax.plot(range(len(pts)), [v for _, v in pts], marker="o")
            ax.set_xticks(range(len(pts)), [fmt_value(k[0]) for k, _ in pts])
            if opd_best is not None:
                ax.axhline(opd_best, color="k", ls="--", lw=1, label=ref)
                ax.legend(fontsize=7)
            ax.set_xlabel(knobs[0])
            ax.set_ylabel("best pass@1")
            ax.set_title(f"{fam}: best pass@1 per configuration", fontsize=8)
    save_png(fig, path)
    return True


def plot_trb_diagnostics(groups, path: Path) -> bool:
    from matplotlib.figure import Figure

    series = [(fam, label, rs) for fam, cfgs in groups.items() for label, rs in cfgs.items()  # whoever logged the blend
              if any("trb/beta_mean" in t for r in rs for t in r.train)]
    if not any(seed_curve(rs, k, "train") for _, _, rs in series for k in DIAGNOSTICS):
        return False
    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, key in zip(axes, DIAGNOSTICS):
        for fam, label, rs in series:
            curve = seed_curve(rs, key, "train")
            if curve:
                xs = list(curve)
                mean = [sum(v) / len(v) for v in curve.values()]
                (line,) = ax.plot(xs, mean, marker=".", label=f"{fam} {label}")
                if len(rs) > 1:
                    ax.fill_between(xs, [min(v) for v in curve.values()], [max(v) for v in curve.values()],
                                    color=line.get_color(), alpha=0.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    save_png(fig, path)
    return True

