"""Preemption: SIGTERM / SIGUSR1 (what SLURM sends before it kills or requeues a job) and Ctrl-C
(SIGINT) ask the training loop to stop after the current step; the loop then writes a checkpoint and
the CLI exits with a documented code:

    EXIT_PREEMPTED = 75   SIGTERM or SIGUSR1: checkpoint written; rerun the same command to resume
                          (75 is EX_TEMPFAIL, "try again later")
    EXIT_INTERRUPTED = 130  SIGINT (128 + 2): checkpoint written, one line names it and the command
                          that resumes it

A second Ctrl-C stops at once (``KeyboardInterrupt``; the CLI still prints one line, no traceback).
"""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


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

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.requested == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = self.requested or name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
