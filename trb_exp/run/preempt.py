"""Preemption: SIGTERM / SIGUSR1 (what SLURM sends before it kills or requeues a job), SIGHUP (a closed
terminal or ssh session) and Ctrl-C (SIGINT) ask the training loop to stop after the current step; the loop
then writes a checkpoint and the CLI exits with a documented code:

    EXIT_PREEMPTED = 75   SIGTERM, SIGUSR1 or SIGHUP: checkpoint written; rerun the same command to resume
                          (75 is EX_TEMPFAIL, "try again later")
    EXIT_INTERRUPTED = 130  SIGINT (128 + 2): checkpoint written, one line names it and the command
                          that resumes it

A second Ctrl-C stops at once (``KeyboardInterrupt``; the CLI still prints one line, no traceback).

From the first instant of ``python -m trb_exp.train`` (``stop_at_startup``, before its imports) until the
run holds its run directory, the same signals stop the process at once with the same exit codes and one
line: there is nothing to save yet, and a run directory Hydra created for the run is removed
(``StartupStop``). Once the run is accepted, a signal during the setup, the initial evaluation or the warm
start gives a step-0 checkpoint.

Inside a submitit job (``hydra/launcher=slurm``, ``submitit_local``) the signal that submitit sends before
the time limit or on preemption (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` names another; SLURM sends it
``signal_delay_s`` before the limit) stops the loop in the same way: the trainer checkpoints first, then
``StopSignals.hand_over`` calls the handler submitit had installed for it, which requeues the job (rank 0;
the other ranks just exit). The requeued job re-enters the same run directory and resumes
(``trainer.resume=auto``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP")


class StartupStop(BaseException):
    """A stop signal before the run had anything to save (a ``BaseException``, like ``KeyboardInterrupt``, so
    that no ``except Exception`` on the way, Hydra's included, turns it into a traceback). ``run_dir``: the
    run directory Hydra had chosen by then, if any."""

    def __init__(self, signame: str, run_dir: str | None = None):
        super().__init__(signame)
        self.signame, self.run_dir = signame, run_dir

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signame == "SIGINT" else EXIT_PREEMPTED

    def line(self, what: str = "run") -> str:
        """One line; ``what``: the run (stopped during its start-up) or an evaluation (stopped anywhere: it
        writes nothing until it has finished)."""
        if what != "run":
            return (f"[{'interrupted' if self.signame == 'SIGINT' else self.signame}] {what} stopped before it "
                    f"finished: nothing written; exit {self.exit_code} (rerun the same command)")
        if self.signame == "SIGINT":
            return "[interrupted] stopped during start-up: nothing to save yet"
        return (f"[{self.signame}] stopped during start-up: nothing to save yet; exit {self.exit_code} "
                "(rerun the same command to start the run)")


def _hydra_run_dir() -> str | None:
    """The run directory Hydra has set for this job, if it got that far (read without importing Hydra)."""
    hc = sys.modules.get("hydra.core.hydra_config")
    try:
        if hc is not None and hc.HydraConfig.initialized():
            return str(hc.HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 -- not set yet (a missing value), or Hydra half imported
        return None
    return None


def _raise_startup_stop(signum, frame):
    raise StartupStop(signal.Signals(signum).name, _hydra_run_dir())


def stop_at_startup() -> None:
    """Until ``StopSignals`` takes over: each stop signal raises ``StartupStop`` (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for name in SIGNALS:
            signal.signal(getattr(signal, name), _raise_startup_stop)


def default_signals() -> None:
    """The interpreter's own handlers again (after the run: a signal then is no start-up stop)."""
    if threading.current_thread() is threading.main_thread():
        for name in SIGNALS:
            signal.signal(getattr(signal, name), signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL)


def submitit_signal() -> str | None:
    """The name of submitit's preemption / time-limit signal inside a submitit job (``SIGUSR2`` by default),
    else None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        import submitit

        name = submitit.JobEnvironment.USR_SIG
    except Exception:  # submitit's own default, as it reads it
        name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return "SIG" + str(name).removeprefix("SIG")


class Stopped(Exception):
    """The loop stopped on a signal after writing ``checkpoint``."""

    def __init__(self, signame: str, checkpoint):
        super().__init__(f"{signame}: checkpoint {checkpoint}")
        self.signame, self.checkpoint = signame, checkpoint

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signame == "SIGINT" else EXIT_PREEMPTED


class StopSignals:
    """Context manager: while active, the signals above set ``requested`` (the signal's name) instead
    of killing the process; the previous handlers come back on exit. Outside the main thread it does
    nothing (Python only lets the main thread install handlers)."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}
        self._previous: dict[str, object] = {}  # signal name -> the handler installed before ours

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.requested == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = self.requested or name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in dict.fromkeys([*SIGNALS, submitit_signal() or "SIGINT"]):
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
                    self._previous[name] = self._old[sig]
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def hand_over(self) -> bool:
        """After the checkpoint of a run stopped by submitit's preemption signal: call the handler submitit had
        installed for it (``SignalHandler.checkpoint_and_try_requeue``: on rank 0 it pickles the job again,
        requeues it and exits; on the other ranks it returns). False (nothing called) outside submitit or for
        any other signal."""
        name = submitit_signal()
        old = self._previous.get(name) if name is not None and self.requested == name else None
        if not callable(old):
            return False
        old(getattr(signal, name), None)
        return True

