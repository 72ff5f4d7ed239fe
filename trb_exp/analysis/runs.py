"""Runs: loading them (the one seam for run directories and data files), grouping them into method
families and configurations.

A run is a folder holding ``metrics.jsonl`` and ``.hydra/config.yaml`` (``summary.json`` once finished),
or its record in a study's data file (``runs.jsonl.gz``; the format lives in ``runstore``).
Runs are grouped by method family (``method.name``) and configuration (the method's knobs, the
schedule's for a run that read it, and any other setting that varies within the family; never the seed).
Nothing here knows a method by name: what a run read is what it logged (``schedule_keys``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from trb_exp.analysis.runstore import InputError, RunRecord, find_run_dirs, read_run_dir
from trb_exp.analysis.runstore import load as load_records
from trb_exp.analysis.stats import steps_to_target

PASS1 = "eval/pass@1"
DIAGNOSTICS = ("trb/eps", "trb/beta_mean", "trb/kl_behavior_student_mean", "rollout/teacher_entropy")
# settings that never define a configuration (seed, where/how a run executed, its logging)
_IGNORED = ("seed", "device", "threads", "logger", "hydra", "trainer.save_student", "trainer.log_every",
            "eval.batch_size", "trainer.rollout_batch_size", "trainer.micro_batch_size", "model.teacher_pass",
            "model.teacher_device", "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.resume",
            "trainer.progress", "trainer.strategy")
# a schedule reader's knobs kept in its configuration; the first three always in its label
_SCHEDULE_KNOBS = ("schedule.name", "schedule.eps0", "schedule.warmup_steps", "schedule.budget")
BUDGET = "trb/eps"  # a rule's logged KL budget: > 0 at some step = the run read the schedule group


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
    overrides: tuple = ()  # the command-line overrides as given (.hydra/overrides.yaml)

    @property
    def warmup_k(self) -> int | None:
        """The run's own warmup horizon: schedule.warmup_steps for a run that read the schedule (logged a
        budget, ``reads_schedule``), else method.K where it has one (veto, temp_warmup), else None."""
        if reads_schedule(self):
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


def run_from_record(rec: RunRecord, path: Path, rel: str) -> Run:
    """A Run from its record: the config resolved and flattened, the metric rows split into evaluations
    (step -> eval/* values) and training rows."""
    try:
        cfg = OmegaConf.to_container(OmegaConf.create(rec.config), resolve=True)
    except Exception:  # an interpolation that cannot resolve outside Hydra: keep it as written
        cfg = rec.config
    flat = _flatten(cfg)
    evals, train = {}, []
    for row in rec.rows:
        if PASS1 in row:
            evals.setdefault(int(row["step"]), {}).update(
                {k: v for k, v in row.items() if k.startswith(("eval/", "val/"))})  # val/: the validation split
        if "train/loss" in row or any(k in row for k in DIAGNOSTICS) or "time/step_s" in row:
            train.append(row)
    overridden = frozenset(k for o in rec.overrides if (k := str(o).split("=", 1)[0].lstrip("+~")) in flat)
    return Run(path=path, rel=rel, method=str(flat.get("method.name", "?")), seed=int(flat.get("seed", 0)),
               cfg=flat, evals=evals, train=train, summary=rec.summary, overridden=overridden,
               overrides=tuple(rec.overrides))


def load_run(path: Path, rel: str) -> Run:
    """The run directory ``path`` (named ``rel`` in reports)."""
    return run_from_record(read_run_dir(path, rel), Path(path), rel)


def load_runs(sources) -> list[Run]:
    """Every run of ``sources``: run directories (searched recursively) and data files
    (``runs.jsonl.gz``, see ``runstore``). Sorted by path, where a data file's run sits at
    ``<data file>/<name>``. A run's ``rel`` is its path relative to the runs' common parent (the parent of a
    single run), so a data file and the directories it was packed from name their runs alike."""
    found: dict[Path, RunRecord | Path] = {}
    for src in map(Path, sources):
        if src.is_file():
            found.update({src.resolve() / rec.name: rec for rec in load_records(src)})
        elif src.is_dir():
            found.update({p: p for p in find_run_dirs([src])})
        else:
            raise InputError(f"error: {src}: no such run directory or data file")
    paths = sorted(found)
    root = Path(os.path.commonpath([str(p) for p in paths])) if len(paths) > 1 else paths[0].parent if paths else None
    runs = []
    for p in paths:
        rel, rec = str(p.relative_to(root)), found[p]
        runs.append(load_run(p, rel) if isinstance(rec, Path) else run_from_record(rec, p, rel))
    return runs


def fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in _IGNORED)


def schedule_keys(r: Run) -> set[str]:
    """The schedule settings a run read, from what it logged: all of them when its rule logged a budget
    (``trb/eps`` > 0 at some step); only ``schedule.budget`` for a run with the old constant budget
    ``method.eps`` (fixed_blend before it became ``schedule=constant``); none otherwise."""
    if "method.eps" in r.cfg:
        return {"schedule.budget"} & set(r.cfg)
    if any(t.get(BUDGET) for t in r.train):
        return {k for k in r.cfg if k.startswith("schedule.")}
    return set()


def reads_schedule(r: Run) -> bool:
    """Whether the run read the whole schedule group (its rule logged a budget), as opposed to reading
    none of it or only the old constant budget (``method.eps``)."""
    return "schedule.warmup_steps" in schedule_keys(r)


def _read_by(key: str, reads: set[str]) -> bool:
    """Whether a family reads a setting: the schedule's only where its runs read it (``reads``)."""
    return not key.startswith("schedule.") or key in reads


def group_runs(runs: list[Run]) -> dict:
    """{family: {config label: [runs sorted by seed]}}; sets run.config / run.knobs. A configuration is
    the run's method.* knobs (+ the schedule knobs for a run that read the schedule, schedule.budget for an
    old method.eps run) plus any other non-ignored setting that varies within the family. Its label names
    the knobs that vary or that a run set on its command line (and a schedule reader's name, eps0, warmup)."""
    fams: dict[str, list[Run]] = {}
    for r in runs:
        fams.setdefault(r.method, []).append(r)
    out = {}
    for fam, rs in sorted(fams.items()):
        keys = set()
        for r in rs:
            keys |= set(r.cfg)
        reads = set().union(*(schedule_keys(r) for r in rs))
        varying = {k for k in keys if not _ignored(k) and _read_by(k, reads)
                   and len({repr(r.cfg.get(k)) for r in rs}) > 1}
        set_by_hand = set().union(*(r.overridden for r in rs))  # shown in labels even when constant
        for r in rs:
            own = {k for k in r.cfg if k.startswith("method.") and k != "method.name"}
            reader = reads_schedule(r)
            if reader:
                own |= {k for k in _SCHEDULE_KNOBS if k in r.cfg}
            if "method.eps" in r.cfg:
                own |= schedule_keys(r)
            r.knobs = {k: r.cfg.get(k) for k in sorted(own | varying)}
            always = {k for k in _SCHEDULE_KNOBS[:3] if k in r.cfg} if reader else set()
            shown = sorted(((varying | set_by_hand) & set(r.knobs)) | always)
            r.config = ",".join(f"{k}={fmt_value(r.knobs[k])}" for k in shown) or "default"
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


def headline_config(configs: dict):
    """The configuration a family is judged by over seeds: among those with >= 2 runs, the one with the
    most runs, then the highest mean final pass@1, then the smallest label. None if none has 2 runs.
    ``configs`` maps label -> runs (objects with ``pass1(step)`` and ``evals``)."""
    cands = [(-len(rs), -sum(r.pass1(max(r.evals)) for r in rs) / len(rs), label)
             for label, rs in configs.items() if len(rs) >= 2]
    return min(cands)[2] if cands else None


def final_pass1(r: Run) -> float:
    return r.pass1(max(r.evals))


def headline_finals(configs: dict, seeds=None) -> dict[int, float]:
    """{seed: final pass@1} of the family's headline configuration ({} without one), optionally only
    the given seeds."""
    label = headline_config(configs)
    return {r.seed: final_pass1(r) for r in configs[label] if seeds is None or r.seed in seeds} if label else {}


def seed_curve(runs: list[Run], key: str = PASS1, source: str = "eval"):
    """{step: [values over seeds]} at steps every run has."""
    per = []
    for r in runs:
        if source == "eval":
            per.append({s: float(e[key]) for s, e in r.evals.items() if key in e})
        else:
            per.append({int(t["step"]): float(t[key]) for t in r.train if key in t})
    common = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return {s: [p[s] for p in per] for s in common}


def train_minutes_at_evals(r: Run) -> dict[int, float]:
    """{evaluated step s: training minutes spent by then}: the sum of ``time/step_s`` over logged steps 1..s
    (logged step k + 1 is training step k; evaluations are not counted). Empty for a run that logged no
    step time."""
    times = sorted((int(t["step"]), float(t["time/step_s"])) for t in r.train if "time/step_s" in t)
    if not times:
        return {}
    out, total, i = {}, 0.0, 0
    for step in sorted(r.evals):
        while i < len(times) and times[i][0] <= step:
            total += times[i][1]
            i += 1
        out[step] = total / 60
    return out


def run_steps_to_target(r: Run, target: float):
    return steps_to_target(list(r.evals), [r.pass1(s) for s in r.evals], target)

