"""What a run ran on: library versions, the CPU's instruction set, threads, GPU and code state.

Bit-exact reproduction of a run holds only within one CPU instruction set (ISA) and one pair of
library versions: on a CPU, AVX-512 and AVX2 kernels differ in the last bits from the first step, and
the difference grows over training. ``Environment`` is written into every run's ``summary.json`` as
``env`` (the key the compact run store reads); ``trb_exp.compare`` warns when it compares runs whose
environments differ in those fields.
To force AVX2 on an AVX-512 machine: ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2``.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# the fields that decide whether two runs can agree bit for bit (compared by ``trb_exp.compare``)
BIT_EXACT_FIELDS = ("cpu_capability", "torch", "transformers")


@dataclass(frozen=True)
class Environment:
    torch: str
    transformers: str
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability(): the ATen kernel ISA (e.g. AVX512, AVX2)
    threads: int  # torch.get_num_threads() when the run finished
    gpu: str | None  # torch.cuda.get_device_name(0), None without CUDA
    commit: str | None  # HEAD of the checkout the package was imported from; None outside a git checkout
    dirty: bool | None  # tracked files differ from HEAD; None outside a git checkout

    def as_dict(self) -> dict:
        return asdict(self)


def git_state(where: Path = PACKAGE_DIR) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty) of the git checkout holding ``where``; (None, None) outside one or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def current_environment(where: Path = PACKAGE_DIR) -> Environment:
    import torch
    import transformers

    commit, dirty = git_state(where)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Environment(torch=torch.__version__, transformers=transformers.__version__,
                       cpu_capability=str(torch.backends.cpu.get_cpu_capability()), threads=torch.get_num_threads(),
                       gpu=gpu, commit=commit, dirty=dirty)


def bit_exact_mismatch(environments: list[dict | None]) -> str | None:
    """One line naming the fields of ``BIT_EXACT_FIELDS`` on which the given environment records differ
    (records that are missing, e.g. runs from before the record existed, are left out); None if they agree."""
    known = [e for e in environments if isinstance(e, dict)]
    parts = []
    for f in BIT_EXACT_FIELDS:
        values = sorted({str(e.get(f)) for e in known})
        if len(values) > 1:
            parts.append(f"{f} {' vs '.join(values)}")
    if not parts:
        return None
    return ("warning: the runs were made in different environments (" + "; ".join(parts)
            + "): their values agree bit for bit only within one ISA and library versions")
