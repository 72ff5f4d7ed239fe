"""The comparison report (markdown): one function per section, assembled by ``build_report``."""

from __future__ import annotations

from dataclasses import dataclass

from trb_exp.analysis.runs import (PASS1, Run, final_pass1, headline_config, headline_finals,
                                   run_steps_to_target, seed_curve, seeded_groups)
from trb_exp.analysis.stats import (best_checkpoint, closest_step, first_step_at_least, mean_ci, paired_difference,
                                    steps_to_target)


@dataclass(frozen=True)
class Roles:
    """The report's roles, chosen by its caller (``compare --focus/--baseline``): the subject family
    (its configurations' end of warmup are the reference steps, it is paired against the baseline per
    configuration) and the family every other one is paired against."""

    focus: str
    baseline: str

    @property
    def F(self) -> str:  # the names as the report's prose writes them
        return self.focus.upper()

    @property
    def B(self) -> str:
        return self.baseline.upper()


def _f(x, nd=3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _ci(mean, half, nd=3, signed=False) -> str:
    if mean is None:
        return "—"
    m = f"{mean:+.{nd}f}" if signed else f"{mean:.{nd}f}"
    return m if half is None else f"{m} ± {half:.{nd}f}"


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _s(x) -> str:
    return "—" if x is None else str(x)


def _focus_refs(groups, roles: Roles) -> list[tuple[str, int]]:
    """(focus config, its end-of-warmup eval step Kt = first eval step >= K of its runs), for each focus
    configuration with a warmup horizon."""
    refs = []
    for label, rs in groups.get(roles.focus, {}).items():
        k = rs[0].warmup_k
        steps = sorted(set.intersection(*(set(r.evals) for r in rs)))
        if steps and k is not None:
            refs.append((label, first_step_at_least(steps, k)))
    return refs


def _mean_step_s(run: Run, k: int | None):
    """Mean time/step_s over logged steps 1..k (training steps 0..k-1, the warmup) and after."""
    rows = [(int(t["step"]), float(t["time/step_s"])) for t in run.train if "time/step_s" in t]
    if k is None:
        return None, (sum(v for _, v in rows) / len(rows) if rows else None)
    during = [v for s, v in rows if s <= k]
    after = [v for s, v in rows if s > k]
    return (sum(during) / len(during) if during else None), (sum(after) / len(after) if after else None)


def _summary_rows(groups: dict, sgroups: dict, best: dict, roles: Roles) -> list[list]:
    """One row per family: its headline configuration over seeds, the paired difference to the
    baseline's, and the paper-protocol best checkpoint."""
    opd = headline_finals(sgroups.get(roles.baseline, {}))
    rows = []
    for fam in groups:
        label = headline_config(sgroups.get(fam, {}))
        b = best.get(fam)
        best_s = f"{b['value']:.3f} (step {b['step']})" if b else "—"
        if label is None:
            rows.append([fam, "—", 0, "—", "—", best_s])
            continue
        finals = headline_finals(sgroups[fam])
        m, h, n = mean_ci(list(finals.values()))
        diff = "—"
        if fam != roles.baseline and opd:
            d = paired_difference(finals, opd)
            diff = _ci(d["mean"], d["half"], signed=True) + f" (n={d['n']})" if d["n"] else "—"
        rows.append([fam, f"`{label}`", n, _ci(m, h), diff, best_s])
    return rows


def _sweep_rows(groups: dict) -> list[list]:
    rows = []
    for fam, cfgs in groups.items():
        if len(cfgs) < 2:
            continue
        for label, rs in cfgs.items():
            b = best_checkpoint({"value": r.pass1(s), "step": s, "config": label, "seed": r.seed, "run": r.rel}
                                for r in rs for s in r.evals if s > 0)
            m, _, n = mean_ci([final_pass1(r) for r in rs])
            rows.append([fam, f"`{label}`", n, f"{b['value']:.3f} (step {b['step']})" if b else "—", _f(m)])
    return rows


def render_paper_table(paper: dict) -> list[str]:
    """The paper's own published numbers, Table-1-shaped, one table per setting, with their source."""
    L = [f"Source: {paper.get('source', 'not given')}. {paper.get('note', '')}".rstrip(), ""]
    if paper.get("caption"):
        L += [f"> {paper['caption']}", ""]
    for setting, tab in paper.get("settings", {}).items():
        L += [f"**{setting}**", ""]
        cols = list(tab["columns"])
        L += _table(["method", *cols], [[m, *[_s(v) for v in vals]] for m, vals in tab["rows"].items()])
    return L


def build_report(runs: list[Run], groups: dict, *, target_frac: float, teacher_pass1: float | None,
                 plots: dict[str, str], roles: Roles, ci_seeds=None, paper: dict | None = None, title: str = "Run comparison",
                 command: str | None = None) -> str:
    """The whole report. The over-seeds and steps-to-target sections read only the ``ci_seeds`` runs."""
    sgroups = seeded_groups(groups, ci_seeds)
    best = _best_per_family(groups)
    L = _header(runs, groups, title, ci_seeds)
    L += _summary_section(groups, sgroups, best, roles)
    L += _runs_section(groups)
    L += _paper_protocol_section(best, paper)
    L += _sweeps_section(groups)
    L += _over_seeds_section(sgroups, roles)
    L += _steps_to_target_section(sgroups, target_frac, teacher_pass1)
    L += _wall_clock_section(groups, roles)
    L += _plots_section(plots, command)
    return "\n".join(L)


def _header(runs, groups, title, ci_seeds) -> list[str]:
    seeds_note = (f" The over-seeds sections use seeds {{{', '.join(map(str, sorted(ci_seeds)))}}} only (the other "
                  "seeds' runs served to select configurations)." if ci_seeds is not None else "")
    return [f"# {title}", "",
            f"{len(runs)} runs, {len(groups)} method families. pass@1 = `{PASS1}` (the setup mean with several "
            "benchmarks). 95% CIs: Student t over seeds (mean ± half-width)." + seeds_note, ""]


def _best_per_family(groups) -> dict:
    """Per family, the paper-protocol best checkpoint over every evaluated step > 0 of every run."""
    best = {}
    for fam, cfgs in groups.items():
        cands = [{"value": r.pass1(s), "step": s, "config": label, "seed": r.seed, "run": r.rel, "r": r}
                 for label, rs in cfgs.items() for r in rs for s in r.evals if s > 0]
        b = best_checkpoint(cands)
        if b is not None:
            best[fam] = b
    return best


def _summary_section(groups, sgroups, best, roles: Roles) -> list[str]:
    L = ["## Summary", "",
         "Per family: its headline configuration (the one with the most seeds) — final pass@1 over seeds and "
         f"the paired per-seed difference to {roles.B}'s headline configuration — and, for contrast, the paper's "
         "protocol (best checkpoint over the whole sweep and every evaluated step).", ""]
    return L + _table(["family", "headline config", "seeds", "final pass@1 (mean ± 95% CI)",
                       f"− {roles.B}, paired (mean ± 95% CI)", "best checkpoint, paper protocol"],
                      _summary_rows(groups, sgroups, best, roles))


def _runs_section(groups) -> list[str]:
    return ["## Runs", ""] + _table(
        ["family", "config", "seed", "run", "eval steps"],
        [[fam, f"`{label}`", r.seed, f"`{r.rel}`", ",".join(str(s) for s in sorted(r.evals))]
         for fam, cfgs in groups.items() for label, rs in cfgs.items() for r in rs])


def _paper_protocol_section(best, paper) -> list[str]:
    L = ["## Best checkpoint per family (the paper's Table 1 protocol)", "",
         "Per family, the checkpoint with the highest pass@1 over every evaluated step > 0 of every run and "
         "configuration of its sweep (selection on the reported numbers themselves, as in the paper: an "
         "optimistic estimate).", ""]
    benches = sorted({k.split("/")[1] for b in best.values() for k in b["r"].evals[b["step"]]
                      if k.count("/") == 2 and k.endswith("/pass@1")})
    rows = []
    for fam, b in best.items():
        ev = b["r"].evals[b["step"]]
        rows.append([fam, *[_f(ev.get(f"eval/{x}/pass@1")) for x in benches], _f(b["value"]),
                     f"`{b['config']}`", b["seed"], b["step"], f"`{b['run']}`"])
    L += _table(["family", *benches, "avg pass@1", "config", "seed", "step", "run"], rows)
    if paper:
        L += ["### The paper's published numbers (for comparison; not produced by this code)", ""]
        L += render_paper_table(paper)
    return L


def _sweeps_section(groups) -> list[str]:
    sweep = _sweep_rows(groups)
    if not sweep:
        return []
    return ["## Sweeps", "",
            "Every configuration of a family with several: its best checkpoint (the paper's per-config "
            "score, Figs 5/6) and the seed-mean pass@1 at the final step.", ""] + _table(
        ["family", "config", "seeds", "best checkpoint pass@1 (step)", "final pass@1"], sweep)


def _over_seeds_section(groups, roles: Roles) -> list[str]:
    """Mean ± CI at the final step and at the end of the focus's warmup; paired differences to the baseline."""
    refs = _focus_refs(groups, roles)
    F, B, f, b = roles.F, roles.B, roles.focus, roles.baseline
    L = ["## Over seeds (the protocol the paper lacks)", "", "### pass@1 at the final step", ""]
    finals = _final_rows(groups)
    L += _table(["family", "config", "seeds", "final step", "pass@1 (mean ± 95% CI)"], finals) if finals else \
        ["No configuration has >= 2 seeds.", ""]
    L += [f"### pass@1 at the end of {F}'s warmup", ""]
    if not refs:
        L += [f"No {f} runs: no warmup step to compare at.", ""]
    else:
        L += [f"For a {f} configuration: its first eval step >= K = `schedule.warmup_steps`; every other family "
              f"is read at its eval step closest to that step (one row per {f} reference).", ""]
        rows = _warmup_rows(groups, refs, roles)
        L += _table([f"{f} reference", "family", "config", "seeds", "step", "pass@1 (mean ± 95% CI)"], rows) \
            if rows else ["No configuration has >= 2 seeds.", ""]
    L += [f"### Paired difference {F} − {B} (per seed)", ""]
    rows = _focus_baseline_rows(groups, refs, roles)
    L += _table([f"{f} config", f"{b} config", "at", "pairs", "per seed (seed: diff)", "mean ± 95% CI"], rows) \
        if rows else [f"No {f} and {b} configurations sharing >= 2 seeds.", ""]
    opd_label = headline_config(groups.get(b, {}))
    rows = _vs_baseline_rows(groups, roles) if opd_label else []
    if rows:
        L += [f"### Paired difference, every other family − {B} (`{opd_label}`), final step", ""]
        L += _table(["family", "config", "pairs", "per seed (seed: diff)", "mean ± 95% CI"], rows)
    return L


def _final_rows(groups) -> list[list]:
    rows = []
    for fam, cfgs in groups.items():
        for label, rs in cfgs.items():
            if len(rs) < 2:
                continue
            steps = {max(r.evals) for r in rs if r.evals}
            m, h, n = mean_ci([r.pass1(max(r.evals)) for r in rs])
            rows.append([fam, f"`{label}`", n, ",".join(str(s) for s in sorted(steps)), _ci(m, h)])
    return rows


def _warmup_rows(groups, refs, roles: Roles) -> list[list]:
    rows = []
    for ref_label, kt in refs:
        for fam, cfgs in groups.items():
            for label, rs in cfgs.items():
                if len(rs) < 2 or (fam == roles.focus and label != ref_label):
                    continue
                vals, steps = [], set()
                for r in rs:
                    s = kt if fam == roles.focus and kt in r.evals else closest_step(r.evals, kt)
                    steps.add(s)
                    vals.append(r.pass1(s))
                m, h, n = mean_ci(vals)
                rows.append([f"`{ref_label}` (step {kt})", fam, f"`{label}`", n,
                             ",".join(str(s) for s in sorted(steps)), _ci(m, h)])
    return rows


def _focus_baseline_rows(groups, refs, roles: Roles) -> list[list]:
    rows = []
    for ref_label, kt in refs:
        trb_runs = {r.seed: r for r in groups[roles.focus][ref_label]}
        for opd_label, ors in groups.get(roles.baseline, {}).items():
            opd_runs = {r.seed: r for r in ors}
            for when in ("final", "warmup"):
                if when == "final":
                    a = {s: r.pass1(max(r.evals)) for s, r in trb_runs.items()}
                    b = {s: r.pass1(max(r.evals)) for s, r in opd_runs.items()}
                    where = "final"
                else:
                    a = {s: r.pass1(kt if kt in r.evals else closest_step(r.evals, kt)) for s, r in trb_runs.items()}
                    b = {s: r.pass1(closest_step(r.evals, kt)) for s, r in opd_runs.items()}
                    where = f"warmup (step ~{kt})"
                d = paired_difference(a, b)
                if d["n"] < 2:
                    continue
                per = ", ".join(f"{s}: {x:+.3f}" for s, x in zip(d["seeds"], d["diffs"]))
                rows.append([f"`{ref_label}`", f"`{opd_label}`", where, d["n"], per,
                             _ci(d["mean"], d["half"], signed=True)])
    return rows


def _vs_baseline_rows(groups, roles: Roles) -> list[list]:
    rows = []
    opd_runs = headline_finals(groups[roles.baseline])
    for fam, cfgs in groups.items():
        label = headline_config(cfgs)
        if fam in (roles.baseline, roles.focus) or label is None:
            continue
        d = paired_difference(headline_finals(cfgs), opd_runs)
        if d["n"] >= 2:
            per = ", ".join(f"{s}: {x:+.3f}" for s, x in zip(d["seeds"], d["diffs"]))
            rows.append([fam, f"`{label}`", d["n"], per, _ci(d["mean"], d["half"], signed=True)])
    return rows


def _steps_to_target_section(groups, target_frac, teacher_pass1) -> list[str]:
    L = ["## Steps to target", ""]
    if teacher_pass1 is None:
        return L + ["Skipped: no teacher pass@1 given (`--teacher-pass1 X`).", ""]
    target = target_frac * teacher_pass1
    L += [f"Target: {target_frac:g} × teacher pass@1 {teacher_pass1:.3f} = {target:.3f}; the first evaluated "
          "step reaching it, on the seed-mean curve and per seed (— = never).", ""]
    rows = []
    for fam, cfgs in groups.items():
        for label, rs in cfgs.items():
            curve = seed_curve(rs)
            mean_steps = steps_to_target(list(curve), [sum(v) / len(v) for v in curve.values()], target)
            per = ", ".join(f"{r.seed}: {_s(run_steps_to_target(r, target))}" for r in rs)
            rows.append([fam, f"`{label}`", len(rs), _s(mean_steps), per])
    return L + _table(["family", "config", "seeds", "seed-mean curve", "per seed"], rows)


def _wall_clock_section(groups, roles: Roles) -> list[str]:
    L = ["## Wall clock", "",
         "`train_s` from summary.json; mean `time/step_s` over the warmup (logged steps 1..K) and after. K = "
         "`schedule.warmup_steps` (trb), `method.K` (veto, temp_warmup), else the smallest "
         f"{roles.focus} K of this report.", ""]
    ref_k = min((k for rs in groups.get(roles.focus, {}).values() for r in rs if (k := r.warmup_k) is not None),
                default=None)
    rows = []
    for fam, cfgs in groups.items():
        per = [(r.summary.get("train_s") if r.summary else None, *_mean_step_s(r, r.warmup_k if r.warmup_k is not None
                                                                            else ref_k)) for rs in cfgs.values() for r in rs]
        cols = [[x for x in col if x is not None] for col in zip(*per)]
        rows.append([fam, len(per), *[_f(sum(c) / len(c), 3 if i else 1) if c else "—" for i, c in enumerate(cols)]])
    L += ["Per family (mean over its runs):", ""]
    L += _table(["family", "runs", "train_s", "step_s during warmup", "step_s after"], rows)
    L += ["Per run:", ""]
    rows = []
    for fam, cfgs in groups.items():
        for label, rs in cfgs.items():
            for r in rs:
                k = r.warmup_k if r.warmup_k is not None else ref_k
                during, after = _mean_step_s(r, k)
                train_s = r.summary.get("train_s") if r.summary else None
                rows.append([fam, f"`{label}`", r.seed, _f(train_s, 1), _s(k), _f(during), _f(after)])
    return L + _table(["family", "config", "seed", "train_s", "K", "step_s during warmup", "step_s after"], rows)


def _plots_section(plots, command) -> list[str]:
    L = ["## Plots", ""]
    for title, name in plots.items():
        L += [f"![{title}]({name})", ""]
    if not plots:
        L += ["No plots (no evaluations).", ""]
    if command:
        L += ["---", "", f"Generated by `{command}`", ""]
    return L
