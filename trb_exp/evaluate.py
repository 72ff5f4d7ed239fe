"""Scoring a checkpoint without training: ``python -m trb_exp.evaluate model.student=PATH dataset=math500``,
or a training run as it was trained: ``python -m trb_exp.evaluate run=<run dir>`` (``run/saved.py``).

Loads ``model.student`` alone (a directory written by ``train`` or a hub id), renders every problem
with the same prompt format as training (``model.chat_template`` / ``system_prompt``), samples
n responses per problem at ``eval.temperature`` with the trainer's decode loop, grades them with the
benchmark's grader (math-verify for the hub benchmarks) and reports, per benchmark, pass@1 = mean
over problems of c/n and the unbiased pass@k for k <= n, plus the setup average over benchmarks.
Writes ``results.json`` and ``results.md`` (a table) to the run directory.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from trb_exp.run.preempt import StartupStop, stop_at_startup

    stop_at_startup()  # from the first instant: a stop signal is one line, exit 75 / 130, and nothing left behind
    try:
        from trb_exp.preflight import preflight

        preflight("evaluate", ("student",))  # offline and a model that is not cached: stop before the slow imports
        from trb_exp.evaluate import main as _importable_main

        _importable_main()
    except StartupStop as stopped:  # an evaluation writes nothing until it has finished: rerun the command
        from trb_exp.run.rundir import discard_new

        discard_new(stopped.run_dir)
        print(stopped.line(what="evaluation"), file=sys.stderr)
        sys.exit(stopped.exit_code)
    sys.exit(0)

import json
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from trb_exp import CONF_DIR
from trb_exp.run import rundir  # noqa: F401  (the ${run_uid:} resolver of hydra.run.dir)
from trb_exp.config import ConfigError
from trb_exp.decode.config import RolloutConfig
from trb_exp.evaluation import evaluate_benchmarks
from trb_exp.experiment import setup_eval
from trb_exp.run.preempt import StartupStop
from trb_exp.run.saved import evaluation_config, explicit_keys


def markdown_table(results: dict, names: list[str]) -> str:
    """Rows: benchmarks, then the average; columns: n, problems, pass@1, pass@k..., mean length."""
    metrics = sorted({k.split("/", 1)[1] for k in results if "/" in k and k.split("/", 1)[1].startswith("pass@")},
                     key=lambda m: (int(m.split("@")[1].split("_")[0]), m))  # pass@1, pass@1_se, pass@2, ...
    cols = ["n", "problems", *metrics, "mean_length"]
    lines = ["| benchmark | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def cell(v, col: str) -> str:
        if v is None:
            return ""
        return str(int(v)) if col in ("n", "problems") else f"{v:.1f}" if col == "mean_length" else f"{v:.4f}"

    keys = {"n": "n_samples", "problems": "n_problems"}
    for name in names:
        lines.append(f"| {name} | " + " | ".join(cell(results.get(f"{name}/{keys.get(c, c)}"), c) for c in cols) + " |")
    lines.append("| **average** | | | " + " | ".join(cell(results.get(m), m) for m in [*metrics, "mean_length"]) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig, out_dir: Path, explicit: set[str] | None = None) -> dict:
    """Score ``cfg.model.student``; a training run's student (``run=``, or a path inside a run dir) is scored
    with the run's own prompt format, task, benchmarks and length unless ``explicit`` (the keys the command
    line set) says otherwise (``run/saved.py``)."""
    cfg = evaluation_config(cfg, explicit or set())
    exp = setup_eval(cfg)  # the student alone; benchmarks rendered with the training prompt format
    ev, name = cfg.eval, str(cfg.model.student)
    names = [b.name for b in exp.benchmarks]
    ks = None if ev.get("ks") is None else tuple(int(k) for k in ev.ks)
    rollout = RolloutConfig(engine=str(ev.get("engine") or "eager"))  # the decode engine of every benchmark
    if rollout.engine == "vllm":  # one student-only vLLM engine for every benchmark (each at its own n)
        from trb_exp.decode.vllm import open_student_rollouts

        open_student_rollouts(exp.student, exp.tok, seed=int(cfg.seed), device=exp.device)
    t0 = time.time()
    try:
        res = evaluate_benchmarks(exp.student, exp.tok, exp.benchmarks, n_samples=ev.get("samples"), ks=ks,
                                  temperature=float(ev.temperature), greedy=bool(ev.greedy),
                                  max_new_tokens=int(ev.max_new_tokens), batch_size=int(ev.batch_size),
                                  seed=int(cfg.seed), eos_ids=exp.eos_ids, progress=True, rollout=rollout)
    finally:
        if rollout.engine == "vllm":
            from trb_exp.decode.vllm import close_rollouts

            close_rollouts()
    out = {"model": name, "benchmarks": names, "eval_s": round(time.time() - t0, 2), "results": res,
           "config": OmegaConf.to_container(cfg, resolve=True)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(out, indent=1))
    table = markdown_table(res, names)
    (out_dir / "results.md").write_text(f"# {name}\n\n{table}")
    print(table, flush=True)
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with rundir.RunDir(out_dir) as rd:
            try:
                run(cfg, out_dir, explicit_keys(HydraConfig.get().overrides.task))
            except (ConfigError, StartupStop):
                rd.reject()  # a rejected or stopped evaluation leaves no directory behind
                raise
            rd.write_hydra(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[done] results in {out_dir / 'results.json'} and {out_dir / 'results.md'}")

