"""Compare training runs: ``python -m trb_exp.compare RUN_DIRS... [--out DIR] [--target-frac 0.8]
[--teacher-pass1 X] [--ci-seeds 1,2] [--paper docs/results/paper_table1.json] [--title T]``.

Every subdirectory of RUN_DIRS holding ``metrics.jsonl`` and ``.hydra/config.yaml`` is a run (a
multirun sweep dir works as is). Runs are grouped by method family (``method.name``) and by
configuration (the method's knobs, the schedule's for ``trb``, and any other setting that varies
within the family; never the seed). Writes ``comparison.md`` (deterministic: re-running on the same
runs reproduces it byte for byte) and PNG plots next to it:

- the paper's Table 1 protocol: per family, the best checkpoint (highest ``eval/pass@1``) over every
  evaluated step (> 0) of every run of every configuration, with its per-benchmark pass@1;
- per configuration with >= 2 seeds: mean ± 95% CI (Student t) of pass@1 at the final step and at the
  end of TRB's warmup, and the paired per-seed difference TRB − OPD with its 95% CI;
- steps-to-target (``--teacher-pass1``): the first evaluated step reaching target_frac × teacher pass@1;
- wall-clock per run and mean step time during and after warmup;
- a summary (each family's headline configuration against OPD), a sweeps table, every family − OPD,
  the paper's own Table 1 (``--paper``), and the plots headline_curves / learning_curves / sweeps /
  trb_diagnostics. Unfinished runs (no summary.json) are left out; the last line names the command.

The maths (``mean_ci``, ``paired_difference``, ``best_checkpoint``, ``steps_to_target``) are pure
functions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

PASS1 = "eval/pass@1"
DIAGNOSTICS = ("trb/eps", "trb/beta_mean", "trb/kl_behavior_student_mean", "rollout/teacher_entropy")
# settings that never define a configuration (seed, where/how a run executed, its logging)
_IGNORED = ("seed", "device", "threads", "logger", "hydra", "trainer.save_student", "trainer.log_every",
            "eval.batch_size", "trainer.rollout_batch_size", "trainer.micro_batch_size", "model.teacher_pass",
            "model.teacher_device", "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.resume",
            "trainer.progress")
_TRB_SCHEDULE_KNOBS = ("schedule.name", "schedule.eps0", "schedule.warmup_steps", "schedule.budget")

# two-sided 97.5% quantiles of Student's t, df = 1..30
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
         2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
         2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
         2.048407, 2.045230, 2.042272)


# ---------------------------------------------------------------------------------------- maths


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table up to 30, then the
    Cornish-Fisher expansion around the normal quantile, error < 1e-5). No scipy needed."""
    if df < 1:
        raise ValueError(f"df={df}: need at least 1 degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean_ci(values) -> tuple[float, float | None, int]:
    """(mean, half-width of the 95% Student-t CI, n). The half-width is None for n < 2."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = sum(v) / n
    if n < 2:
        return mean, None, n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return mean, t_quantile_975(n - 1) * sd / math.sqrt(n), n


def paired_difference(a: dict, b: dict) -> dict:
    """Per-seed differences a[seed] − b[seed] over the seeds in both (sorted), their mean and 95% CI.
    Returns {"seeds", "diffs", "mean", "half", "n"} (mean/half None without common seeds)."""
    seeds = sorted(set(a) & set(b))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    if not diffs:
        return {"seeds": [], "diffs": [], "mean": None, "half": None, "n": 0}
    mean, half, n = mean_ci(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "half": half, "n": n}


def best_checkpoint(candidates):
    """The candidate with the highest ``value``; ties go to the earliest step, then the smallest
    (config, seed, run). Candidates are dicts with at least value, step, config, seed, run."""
    cands = list(candidates)
    if not cands:
        return None
    return min(cands, key=lambda c: (-c["value"], c["step"], str(c["config"]), c["seed"], str(c["run"])))


def steps_to_target(steps, values, target: float):
    """The first step (in increasing step order) whose value is >= target (up to 1e-9, so that
    0.8 × 0.75 is reached by 0.6), else None."""
    for s, v in sorted(zip(steps, values)):
        if v >= target - 1e-9:
            return s
    return None


def closest_step(steps, k: int):
    """The step of ``steps`` closest to k (ties: the smaller)."""
    steps = sorted(steps)
    return min(steps, key=lambda s: (abs(s - k), s)) if steps else None


def first_step_at_least(steps, k: int):
    """The first step >= k, else the last step (None without steps)."""
    steps = sorted(steps)
    return next((s for s in steps if s >= k), steps[-1] if steps else None)


def headline_config(configs: dict):
    """The configuration a family is judged by over seeds: among those with >= 2 runs, the one with the
    most runs, then the highest mean final pass@1, then the smallest label. None if none has 2 runs.
    ``configs`` maps label -> runs (objects with ``pass1(step)`` and ``evals``)."""
    cands = [(-len(rs), -sum(r.pass1(max(r.evals)) for r in rs) / len(rs), label)
             for label, rs in configs.items() if len(rs) >= 2]
    return min(cands)[2] if cands else None


# ----------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    path: Path
    rel: str
    method: str
    seed: int
    cfg: dict
    evals: dict  # step -> {eval key: value}
    train: list  # train rows (dicts with "step")
    summary: dict | None
    config: str = ""  # label of the configuration (set by group_runs)
    knobs: dict = field(default_factory=dict)
    overridden: frozenset = frozenset()  # dotted keys set on the command line (.hydra/overrides.yaml)

    @property
    def warmup_k(self) -> int | None:
        """The run's own warmup horizon: schedule.warmup_steps (trb), method.K (veto, temp_warmup)."""
        if self.method == "trb":
            return int(self.cfg["schedule.warmup_steps"])
        try:
            return int(self.cfg["method.K"]) if "method.K" in self.cfg else None
        except (TypeError, ValueError):  # an unresolved interpolation
            return None

    def pass1(self, step: int) -> float:
        return float(self.evals[step][PASS1])


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, list) else v
    return out


def find_run_dirs(roots) -> list[Path]:
    found = set()
    for root in roots:
        root = Path(root)
        for m in root.rglob("metrics.jsonl"):
            if (m.parent / ".hydra" / "config.yaml").is_file():
                found.add(m.parent.resolve())
    return sorted(found)


class InputError(SystemExit):
    """A bad input: ``error: <one line>`` on stderr and exit code 2, like the trainer's."""

    def __init__(self, message: str):
        print(message, file=sys.stderr)
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _bad(path: Path, what: str) -> SystemExit:
    return InputError(f"error: {path}: {what}; fix or remove that run directory")


def load_run(path: Path, rel: str) -> Run:
    try:
        raw = OmegaConf.load(path / ".hydra" / "config.yaml")
    except Exception as e:
        raise _bad(path / ".hydra" / "config.yaml", f"not a readable config ({type(e).__name__})") from None
    try:
        cfg = OmegaConf.to_container(raw, resolve=True)
    except Exception:  # an interpolation that cannot resolve outside Hydra: keep it as written
        cfg = OmegaConf.to_container(raw, resolve=False)
    flat = _flatten(cfg)
    evals, train = {}, []
    for n, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _bad(path / "metrics.jsonl", f"line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise _bad(path / "metrics.jsonl", f"line {n} is not a metrics row (a JSON object with an integer step)")
        if PASS1 in row:
            evals.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if k.startswith("eval/")})
        if "train/loss" in row or any(k in row for k in DIAGNOSTICS) or "time/step_s" in row:
            train.append(row)
    sp = path / "summary.json"
    try:
        summary = json.loads(sp.read_text()) if sp.is_file() else None
    except json.JSONDecodeError as e:
        raise _bad(sp, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if summary is not None and not isinstance(summary, dict):
        raise _bad(sp, "not a summary (a JSON object)")
    op = path / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(op)) if op.is_file() else []
    overridden = frozenset(k for o in overrides if (k := str(o).split("=", 1)[0].lstrip("+~")) in flat)
    return Run(path=path, rel=rel, method=str(flat.get("method.name", "?")), seed=int(flat.get("seed", 0)),
               cfg=flat, evals=evals, train=train, summary=summary, overridden=overridden)


def _fmt_val(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in _IGNORED)


def _read_by(family: str, key: str) -> bool:
    """Whether a method family reads a setting: only trb reads the schedule (fixed_blend: its budget kind)."""
    if not key.startswith("schedule."):
        return True
    return family == "trb" or (family == "fixed_blend" and key == "schedule.budget")


def group_runs(runs: list[Run]) -> dict:
    """{family: {config label: [runs sorted by seed]}}; sets run.config / run.knobs. A configuration is
    the run's method.* knobs (+ schedule knobs for trb, schedule.budget for fixed_blend) plus any other
    non-ignored setting that varies within the family. Its label names the knobs that vary or that a
    run set on its command line."""
    fams: dict[str, list[Run]] = {}
    for r in runs:
        fams.setdefault(r.method, []).append(r)
    out = {}
    for fam, rs in sorted(fams.items()):
        keys = set()
        for r in rs:
            keys |= set(r.cfg)
        varying = {k for k in keys if not _ignored(k) and _read_by(fam, k)
                   and len({repr(r.cfg.get(k)) for r in rs}) > 1}
        set_by_hand = set().union(*(r.overridden for r in rs))  # shown in labels even when constant
        for r in rs:
            own = {k for k in r.cfg if k.startswith("method.") and k != "method.name"}
            if fam == "trb":
                own |= {k for k in _TRB_SCHEDULE_KNOBS if k in r.cfg}
            if fam == "fixed_blend" and "schedule.budget" in r.cfg:
                own.add("schedule.budget")
            r.knobs = {k: r.cfg.get(k) for k in sorted(own | varying)}
            shown = sorted(((varying | set_by_hand) & set(r.knobs)) | ({k for k in _TRB_SCHEDULE_KNOBS[:3] if k in r.cfg}
                                                                       if fam == "trb" else set()))
            r.config = ",".join(f"{k}={_fmt_val(r.knobs[k])}" for k in shown) or "default"
        groups: dict[str, list[Run]] = {}
        for r in rs:
            groups.setdefault(r.config, []).append(r)
        for label, grs in groups.items():  # knobs identical within a label (the label may omit constant ones)
            by_knobs = {}
            for r in grs:
                by_knobs.setdefault(repr(sorted(r.knobs.items())), []).append(r)
            if len(by_knobs) > 1:
                for i, (_, sub) in enumerate(sorted(by_knobs.items())):
                    for r in sub:
                        r.config = f"{label}#{i}"
        out[fam] = {}
        for r in rs:
            out[fam].setdefault(r.config, []).append(r)
        out[fam] = {k: sorted(v, key=lambda r: (r.seed, r.rel)) for k, v in sorted(out[fam].items())}
    return out


# --------------------------------------------------------------------------------------- report


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


def _seed_curve(runs: list[Run], key: str = PASS1, source: str = "eval"):
    """{step: [values over seeds]} at steps every run has."""
    per = []
    for r in runs:
        if source == "eval":
            per.append({s: float(e[key]) for s, e in r.evals.items() if key in e})
        else:
            per.append({int(t["step"]): float(t[key]) for t in r.train if key in t})
    common = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return {s: [p[s] for p in per] for s in common}


def _trb_refs(groups) -> list[tuple[str, int]]:
    """(trb config, its end-of-warmup eval step Kt = first eval step >= K of its runs)."""
    refs = []
    for label, rs in groups.get("trb", {}).items():
        k = rs[0].warmup_k
        steps = sorted(set.intersection(*(set(r.evals) for r in rs)))
        if steps:
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


def seeded_groups(groups: dict, ci_seeds) -> dict:
    """``groups`` restricted to the runs whose seed is in ``ci_seeds`` (None = all runs)."""
    if ci_seeds is None:
        return groups
    out = {}
    for fam, cfgs in groups.items():
        kept = {label: [r for r in rs if r.seed in ci_seeds] for label, rs in cfgs.items()}
        kept = {label: rs for label, rs in kept.items() if rs}
        if kept:
            out[fam] = kept
    return out


def _final(r: Run) -> float:
    return r.pass1(max(r.evals))


def headline_finals(configs: dict, seeds=None) -> dict[int, float]:
    """{seed: final pass@1} of the family's headline configuration ({} without one), optionally only
    the given seeds."""
    label = headline_config(configs)
    return {r.seed: _final(r) for r in configs[label] if seeds is None or r.seed in seeds} if label else {}


def _summary_rows(groups: dict, sgroups: dict, best: dict) -> list[list]:
    """One row per family: its headline configuration over seeds, the paired difference to OPD's, and
    the paper-protocol best checkpoint."""
    opd = headline_finals(sgroups.get("opd", {}))
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
        if fam != "opd" and opd:
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
            m, _, n = mean_ci([_final(r) for r in rs])
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
                 plots: dict[str, str], ci_seeds=None, paper: dict | None = None, title: str = "Run comparison",
                 command: str | None = None) -> str:
    sgroups = seeded_groups(groups, ci_seeds)
    seeds_note = (f" The over-seeds sections use seeds {{{', '.join(map(str, sorted(ci_seeds)))}}} only (the other "
                  "seeds' runs served to select configurations)." if ci_seeds is not None else "")
    L = [f"# {title}", ""]
    L += [f"{len(runs)} runs, {len(groups)} method families. pass@1 = `{PASS1}` (the setup mean with several "
          "benchmarks). 95% CIs: Student t over seeds (mean ± half-width)." + seeds_note, ""]
    best = {}
    for fam, cfgs in groups.items():
        cands = [{"value": r.pass1(s), "step": s, "config": label, "seed": r.seed, "run": r.rel, "r": r}
                 for label, rs in cfgs.items() for r in rs for s in r.evals if s > 0]
        b = best_checkpoint(cands)
        if b is not None:
            best[fam] = b
    L += ["## Summary", "",
          "Per family: its headline configuration (the one with the most seeds) — final pass@1 over seeds and "
          "the paired per-seed difference to OPD's headline configuration — and, for contrast, the paper's "
          "protocol (best checkpoint over the whole sweep and every evaluated step).", ""]
    L += _table(["family", "headline config", "seeds", "final pass@1 (mean ± 95% CI)", "− OPD, paired (mean ± 95% CI)",
                 "best checkpoint, paper protocol"], _summary_rows(groups, sgroups, best))
    L += ["## Runs", ""]
    L += _table(["family", "config", "seed", "run", "eval steps"],
                [[fam, f"`{label}`", r.seed, f"`{r.rel}`", ",".join(str(s) for s in sorted(r.evals))]
                 for fam, cfgs in groups.items() for label, rs in cfgs.items() for r in rs])

    # 1. the paper's protocol ------------------------------------------------------------------
    L += ["## Best checkpoint per family (the paper's Table 1 protocol)", "",
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

    sweep = _sweep_rows(groups)
    if sweep:
        L += ["## Sweeps", "",
              "Every configuration of a family with several: its best checkpoint (the paper's per-config "
              "score, Figs 5/6) and the seed-mean pass@1 at the final step.", ""]
        L += _table(["family", "config", "seeds", "best checkpoint pass@1 (step)", "final pass@1"], sweep)

    # 2. seeds: mean ± CI at the final step and at the end of warmup ---------------------------
    L += ["## Over seeds (the protocol the paper lacks)", ""]
    groups_all, groups = groups, sgroups  # the over-seeds sections read only the ci seeds
    refs = _trb_refs(groups)
    finals = []
    for fam, cfgs in groups.items():
        for label, rs in cfgs.items():
            if len(rs) < 2:
                continue
            steps = {max(r.evals) for r in rs if r.evals}
            m, h, n = mean_ci([r.pass1(max(r.evals)) for r in rs])
            finals.append([fam, f"`{label}`", n, ",".join(str(s) for s in sorted(steps)), _ci(m, h)])
    L += ["### pass@1 at the final step", ""]
    L += _table(["family", "config", "seeds", "final step", "pass@1 (mean ± 95% CI)"], finals) if finals else \
        ["No configuration has >= 2 seeds.", ""]

    L += ["### pass@1 at the end of TRB's warmup", ""]
    if not refs:
        L += ["No trb runs: no warmup step to compare at.", ""]
    else:
        L += ["For a trb configuration: its first eval step >= K = `schedule.warmup_steps`; every other family "
              "is read at its eval step closest to that step (one row per trb reference).", ""]
        rows = []
        for ref_label, kt in refs:
            for fam, cfgs in groups.items():
                for label, rs in cfgs.items():
                    if len(rs) < 2 or (fam == "trb" and label != ref_label):
                        continue
                    vals, steps = [], set()
                    for r in rs:
                        s = kt if fam == "trb" and kt in r.evals else closest_step(r.evals, kt)
                        steps.add(s)
                        vals.append(r.pass1(s))
                    m, h, n = mean_ci(vals)
                    rows.append([f"`{ref_label}` (step {kt})", fam, f"`{label}`", n,
                                 ",".join(str(s) for s in sorted(steps)), _ci(m, h)])
        L += _table(["trb reference", "family", "config", "seeds", "step", "pass@1 (mean ± 95% CI)"], rows) \
            if rows else ["No configuration has >= 2 seeds.", ""]

    L += ["### Paired difference TRB − OPD (per seed)", ""]
    rows = []
    for ref_label, kt in refs:
        trb_runs = {r.seed: r for r in groups["trb"][ref_label]}
        for opd_label, ors in groups.get("opd", {}).items():
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
    L += _table(["trb config", "opd config", "at", "pairs", "per seed (seed: diff)", "mean ± 95% CI"], rows) \
        if rows else ["No trb and opd configurations sharing >= 2 seeds.", ""]
    opd_label = headline_config(groups.get("opd", {}))
    rows = []
    if opd_label:
        opd_runs = headline_finals(groups["opd"])
        for fam, cfgs in groups.items():
            label = headline_config(cfgs)
            if fam in ("opd", "trb") or label is None:
                continue
            d = paired_difference(headline_finals(cfgs), opd_runs)
            if d["n"] >= 2:
                per = ", ".join(f"{s}: {x:+.3f}" for s, x in zip(d["seeds"], d["diffs"]))
                rows.append([fam, f"`{label}`", d["n"], per, _ci(d["mean"], d["half"], signed=True)])
    if rows:
        L += [f"### Paired difference, every other family − OPD (`{opd_label}`), final step", ""]
        L += _table(["family", "config", "pairs", "per seed (seed: diff)", "mean ± 95% CI"], rows)

    # 3. steps-to-target -----------------------------------------------------------------------
    L += ["## Steps to target", ""]
    if teacher_pass1 is None:
        L += ["Skipped: no teacher pass@1 given (`--teacher-pass1 X`).", ""]
    else:
        target = target_frac * teacher_pass1
        L += [f"Target: {target_frac:g} × teacher pass@1 {teacher_pass1:.3f} = {target:.3f}; the first evaluated "
              "step reaching it, on the seed-mean curve and per seed (— = never).", ""]
        rows = []
        for fam, cfgs in groups.items():
            for label, rs in cfgs.items():
                curve = _seed_curve(rs)
                mean_steps = steps_to_target(list(curve), [sum(v) / len(v) for v in curve.values()], target)
                per = ", ".join(f"{r.seed}: {_s(_run_steps_to_target(r, target))}"
                                for r in rs)
                rows.append([fam, f"`{label}`", len(rs), _s(mean_steps), per])
        L += _table(["family", "config", "seeds", "seed-mean curve", "per seed"], rows)

    # 4. wall clock ----------------------------------------------------------------------------
    L += ["## Wall clock", "",
          "`train_s` from summary.json; mean `time/step_s` over the warmup (logged steps 1..K) and after. K = "
          "`schedule.warmup_steps` (trb), `method.K` (veto, temp_warmup), else the smallest trb K of this report.", ""]
    groups = groups_all
    ref_k = min((r.warmup_k for rs in groups.get("trb", {}).values() for r in rs), default=None)
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
    L += _table(["family", "config", "seed", "train_s", "K", "step_s during warmup", "step_s after"], rows)

    # 5. plots ---------------------------------------------------------------------------------
    L += ["## Plots", ""]
    for title, name in plots.items():
        L += [f"![{title}]({name})", ""]
    if not plots:
        L += ["No plots (no evaluations).", ""]
    if command:
        L += ["---", "", f"Generated by `{command}`", ""]
    return "\n".join(L)


def _run_steps_to_target(r: Run, target: float):
    return steps_to_target(list(r.evals), [r.pass1(s) for s in r.evals], target)


def _s(x) -> str:
    return "—" if x is None else str(x)


# ---------------------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _band(ax, curve, n_runs, **kw):
    xs = list(curve)
    (line,) = ax.plot(xs, [sum(v) / len(v) for v in curve.values()], marker="o", ms=3, **kw)
    if n_runs > 1:
        ax.fill_between(xs, [min(v) for v in curve.values()], [max(v) for v in curve.values()],
                        color=line.get_color(), alpha=0.15)
    return line


def plot_headline_curves(sgroups, path: Path, teacher_pass1: float | None = None) -> bool:
    """One axis: each family's headline configuration, seed mean with a min-max band."""
    from matplotlib.figure import Figure

    series = [(fam, label, cfgs[label]) for fam, cfgs in sgroups.items()
              if (label := headline_config(cfgs)) is not None and _seed_curve(cfgs[label])]
    if not series:
        return False
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for fam, label, rs in series:
        _band(ax, _seed_curve(rs), len(rs), label=f"{fam} (n={len(rs)})", lw=2.5 if fam in ("trb", "opd") else 1.2)
    if teacher_pass1 is not None:
        ax.axhline(teacher_pass1, color="k", ls=":", lw=1, label=f"teacher {teacher_pass1:.3f}")
    ax.set_title("pass@1, each family's headline configuration: seed mean, band = min-max", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("pass@1")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, ncol=2)
    _save(fig, path)
    return True


def plot_learning_curves(groups, path: Path) -> bool:
    """One panel per family (shared y axis), one line per configuration."""
    from matplotlib.figure import Figure

    fams = [f for f, cfgs in groups.items() if any(_seed_curve(rs) for rs in cfgs.values())]
    if not fams:
        return False
    ncol = min(4, len(fams))
    nrow = (len(fams) + ncol - 1) // ncol
    fig = Figure(figsize=(4.5 * ncol, 3.6 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, fam in zip(axes, fams):
        for label, rs in groups[fam].items():
            curve = _seed_curve(rs)
            if curve:
                _band(ax, curve, len(rs), label=f"{label} (n={len(rs)})"[:60], lw=1)
        ax.set_title(f"{fam}: pass@1 per configuration", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("pass@1")
        if len(groups[fam]) <= 6:
            ax.legend(fontsize=6)
    for ax in axes[len(fams):]:
        ax.set_visible(False)
    _save(fig, path)
    return True


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def plot_sweeps(groups, path: Path) -> bool:
    """The paper's Figs 5/6: per family with several configurations, the best-checkpoint pass@1 of each:
    a heatmap over two swept knobs, a line over one; OPD's best checkpoint for reference."""
    from matplotlib.figure import Figure

    def best_of(rs):
        return max((r.pass1(s) for r in rs for s in r.evals if s > 0), default=None)

    opd_best = max((b for rs in groups.get("opd", {}).values() if (b := best_of(rs)) is not None), default=None)
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
    ref = f"OPD best {opd_best:.3f}" if opd_best is not None else "no OPD run"
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
            ax.set_xticks(range(len(xs)), [_fmt_val(x) for x in xs])
            ax.set_yticks(range(len(ys)), [_fmt_val(y) for y in ys])
            ax.set_xlabel(knobs[0])
            ax.set_ylabel(knobs[1])
            fig.colorbar(im, ax=ax, shrink=0.8)
            ax.set_title(f"{fam}: best pass@1 ({ref}; * = above it)", fontsize=8)
        else:
            pts = sorted(vals.items(), key=lambda kv: (str(type(kv[0][0])), kv[0][0]))
            ax.plot(range(len(pts)), [v for _, v in pts], marker="o")
            ax.set_xticks(range(len(pts)), [_fmt_val(k[0]) for k, _ in pts])
            if opd_best is not None:
                ax.axhline(opd_best, color="k", ls="--", lw=1, label=ref)
                ax.legend(fontsize=7)
            ax.set_xlabel(knobs[0])
            ax.set_ylabel("best pass@1")
            ax.set_title(f"{fam}: best pass@1 per configuration", fontsize=8)
    _save(fig, path)
    return True


def plot_trb_diagnostics(groups, path: Path) -> bool:
    from matplotlib.figure import Figure

    series = [(fam, label, rs) for fam in ("trb", "fixed_blend") for label, rs in groups.get(fam, {}).items()]
    if not any(_seed_curve(rs, k, "train") for _, _, rs in series for k in DIAGNOSTICS):
        return False
    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, key in zip(axes, DIAGNOSTICS):
        for fam, label, rs in series:
            curve = _seed_curve(rs, key, "train")
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
    _save(fig, path)
    return True


# ----------------------------------------------------------------------------------------- main


def compare(run_dirs, out: Path, *, target_frac: float = 0.8, teacher_pass1: float | None = None,
            ci_seeds=None, paper: dict | None = None, title: str = "Run comparison", command: str | None = None) -> Path:
    paths = find_run_dirs(run_dirs)
    if not paths:
        raise InputError(f"error: no run (metrics.jsonl + .hydra/config.yaml) under {', '.join(map(str, run_dirs))}")
    root = Path(os.path.commonpath([str(p) for p in paths])) if len(paths) > 1 else paths[0].parent
    runs = [load_run(p, str(p.relative_to(root))) for p in paths]
    unfinished = sum(r.summary is None for r in runs)
    if unfinished:
        print(f"[compare] skipping {unfinished} unfinished run(s) (no summary.json)", file=sys.stderr)
    runs = [r for r in runs if r.evals and r.summary is not None]
    if not runs:
        raise InputError("error: none of the runs has finished (summary.json) with an evaluation row")
    groups = group_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    if plot_headline_curves(seeded_groups(groups, ci_seeds), out / "headline_curves.png", teacher_pass1):
        plots["headline learning curves"] = "headline_curves.png"
    if plot_learning_curves(groups, out / "learning_curves.png"):
        plots["learning curves per configuration"] = "learning_curves.png"
    if plot_sweeps(groups, out / "sweeps.png"):
        plots["sweeps"] = "sweeps.png"
    if plot_trb_diagnostics(seeded_groups(groups, ci_seeds), out / "trb_diagnostics.png"):
        plots["TRB diagnostics"] = "trb_diagnostics.png"
    report = build_report(runs, groups, target_frac=target_frac, teacher_pass1=teacher_pass1, plots=plots,
                          ci_seeds=ci_seeds, paper=paper, title=title, command=command)
    path = out / "comparison.md"
    path.write_text(report)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m trb_exp.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="run dirs or multirun sweep dirs (searched recursively)")
    p.add_argument("--out", default=None, help="output dir (default: <common parent of RUN_DIRS>/comparison)")
    p.add_argument("--target-frac", type=float, default=0.8, help="steps-to-target: fraction of the teacher")
    p.add_argument("--teacher-pass1", type=float, default=None, help="teacher pass@1 (else no steps-to-target)")
    p.add_argument("--ci-seeds", default=None,
                   help="comma list: the over-seeds sections use only these seeds (e.g. leave out the seed that "
                        "selected each family's configuration); default all")
    p.add_argument("--paper", default=None, help="JSON of the paper's published table, rendered next to ours")
    p.add_argument("--title", default="Run comparison", help="the report's title")
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
    out = a.out or str(Path(os.path.commonpath([str(Path(d).resolve()) for d in a.run_dirs])) / "comparison")
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"error: --out {out}: a file is there; give a directory (it is created if missing)")
    command = "python -m trb_exp.compare " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    path = compare(a.run_dirs, Path(out), target_frac=a.target_frac, teacher_pass1=a.teacher_pass1,
                   ci_seeds=ci_seeds, paper=paper, title=a.title, command=command)
    print(f"[compare] wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
