"""The training CLI: ``python -m trb_exp.train method=trb schedule=linear`` (Hydra composes ``conf/``).

``main`` checks the run directory (``rundir.py``), runs ``trainer.run`` (the loop), and turns what can
go wrong into one line: a bad config or a taken run dir is exit 2, a stop signal leaves a checkpoint and
exits 75 (SIGTERM/SIGUSR1/SIGHUP) or 130 (SIGINT) with the command that resumes it; before the run holds
its run directory (the imports included) a stop signal is one line with nothing to save
(``run/preempt.py``). This module imports neither torch nor transformers at the top: a sweep's launching
process (joblib, submitit) composes the jobs without them, and the jobs import the trainer where they run.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from trb_exp.run.preempt import StartupStop, stop_at_startup

    stop_at_startup()  # from the first instant: a stop signal during the imports is one line, no traceback
    try:
        from trb_exp.preflight import preflight

        preflight("config")  # offline and a model that is not cached: stop before the slow imports
        # Hydra's parallel launchers (joblib, submitit) pickle the task function: hand them the importable
        # trb_exp.train.main, not this file's copy in __main__, which their workers cannot unpickle.
        from trb_exp.train import main as _importable_main

        _importable_main()
    except StartupStop as stopped:
        from trb_exp.run.rundir import discard_new

        discard_new(stopped.run_dir)
        print(stopped.line(), file=sys.stderr)
        sys.exit(stopped.exit_code)
    sys.exit(0)

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from trb_exp import CONF_DIR
from trb_exp.config import ConfigError
from trb_exp.run.preempt import EXIT_INTERRUPTED, Stopped, StopSignals, default_signals, submitit_signal
from trb_exp.run.rundir import FinishedRun, RunDir


def resume_command(run_dir: Path) -> str:
    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "trainer.resume="))]
    return " ".join(["python -m trb_exp.train", *args, f"hydra.run.dir={run_dir}"])


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from trb_exp.distributed import (
        init_distributed,  # torch: imported where the job runs
    )
    from trb_exp.trainer import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    dist = stop = None
    try:
        dist = init_distributed(str(cfg.device))  # torchrun / a submitit job of N tasks: one process per device
        if dist.active:  # every rank works in rank 0's run directory (Hydra made one per process)
            print(f"[distributed] rank {dist.rank} of {dist.world} ({dist.backend})", flush=True)
            own, run_dir = run_dir, Path(dist.broadcast(str(run_dir)))
            if not dist.is_main and own.resolve() != run_dir.resolve():
                with RunDir(own) as rd:
                    rd.reject()  # the directory Hydra created for this rank: nothing of it stays
        if not dist.is_main:
            with StopSignals() as stop:
                summary = run(cfg, run_dir, stop, dist=dist)
            dist.close()
            return None
        with RunDir(run_dir) as rd, StopSignals() as stop:
            try:
                summary = run(cfg, run_dir, stop, on_accept=lambda ckpt: rd.write_hydra(cfg, overwrite=ckpt is None),
                              dist=dist)
            except ConfigError:
                rd.reject()  # leave no trace: a new directory goes, an existing one is as it was
                raise
            except Exception:  # a bug (its traceback follows): a run that logged nothing leaves no directory
                if not (run_dir / "metrics.jsonl").exists():
                    rd.reject()
                raise
        default_signals()  # the run is done: a signal now is no start-up stop
        dist.close()
    except FinishedRun as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # a re-submitted sweep: keep the finished job, go on
            print(f"[skip] {run_dir} holds a finished run (summary.json)", file=sys.stderr)
            return json.loads((run_dir / "summary.json").read_text())["final"].get("eval/pass@1")
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        if dist is None or dist.is_main:  # every rank raises the same error: one line (init errors: each rank's)
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        if dist is not None:  # every rank stopped after the same step: leave the process group together
            dist.close()
        if e.signame == "SIGINT":
            print(f"[interrupted] checkpoint {e.checkpoint}; resume with: {resume_command(run_dir)}", file=sys.stderr)
        elif e.signame == submitit_signal():
            print(f"[{e.signame}] checkpoint {e.checkpoint}; submitit requeues the job, which resumes it", file=sys.stderr)
            stop.hand_over()  # submitit's requeue: rank 0 exits in there
        else:
            print(f"[{e.signame}] checkpoint {e.checkpoint}; exit {e.exit_code} (rerun the same command to resume)",
                  file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of the step in flight
        from trb_exp.run.state import list_checkpoints

        ckpts = list_checkpoints(run_dir / "checkpoints")
        where = f"last checkpoint {ckpts[-1]}; resume with: {resume_command(run_dir)}" if ckpts else "no checkpoint yet"
        print(f"[interrupted] stopped at once; {where}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    final = summary["final"]
    print(f"[done] {summary['method']}: pass@1 {summary['initial']['eval/pass@1']:.3f} -> "
          f"{final['eval/pass@1']:.3f} in {summary['train_s']:.0f}s; run dir {run_dir}")
    return final.get("eval/pass@1")

