"""Runs as data: every run of a study in one compact, versioned file (``runs.jsonl.gz``), and back.

A run directory holds ``metrics.jsonl``, ``.hydra/config.yaml`` (and ``.hydra/overrides.yaml``,
``summary.json`` once finished). A data file holds the same for many runs, format ``trb_exp.runs``
version 1: gzip (mtime 0) of JSON lines, the first a header, then one run per line sorted by name:

    {"format": "trb_exp.runs", "version": 1}
    {"commit": str|null, "config": {.hydra/config.yaml}, "env": {...}|null, "name": "sweep/opd/0_seed=0",
     "overrides": [.hydra/overrides.yaml], "rows": [metrics.jsonl rows], "seed": int|null,
     "summary": {summary.json}|null}

``name`` is the run directory's path relative to the packed root. ``seed`` is the config's; ``commit``
and ``env`` are the summary's own records of them where it has them (null otherwise). Checkpoints,
logs and ``.hydra/hydra.yaml`` are not kept: no report reads them. A line's top-level
keys are sorted; the objects inside keep their files' order, so ``unpack`` writes the four files back
byte for byte and re-packing the same runs gives the same bytes.

    python -m trb_exp.analysis.runstore pack ROOT OUT      # every run directory under ROOT -> OUT
    python -m trb_exp.analysis.runstore unpack DATA DIR    # DATA's runs -> DIR/<name>/ (DIR/<name> must not exist)

Reading runs for analysis goes through ``trb_exp.analysis.runs.load_runs``, which takes either form.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from omegaconf import OmegaConf

FORMAT, VERSION = "trb_exp.runs", 1
HEADER = {"format": FORMAT, "version": VERSION}
_FIELDS = ("commit", "config", "env", "name", "overrides", "rows", "seed", "summary")


class InputError(SystemExit):
    """A bad input: ``error: <one line>`` on stderr and exit code 2, like the trainer's."""

    def __init__(self, message: str):
        print(message, file=sys.stderr)
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class RunRecord:
    """One run as data: what its directory's four files hold."""

    name: str  # the run directory's path relative to the packed root (POSIX separators)
    overrides: list[str]  # .hydra/overrides.yaml: the command-line overrides
    seed: int | None  # the config's seed
    commit: str | None  # the code's commit, where summary.json records it
    env: dict | None  # the run's environment record, where summary.json has one
    config: dict  # .hydra/config.yaml as written (interpolations unresolved)
    summary: dict | None  # summary.json; None for an unfinished run
    rows: list[dict]  # metrics.jsonl, one dict per line

    def to_json(self) -> str:
        return json.dumps({f: getattr(self, f) for f in _FIELDS})


# ---------------------------------------------------------------------------------- run directories
def _bad_dir(path: Path, what: str) -> InputError:
    return InputError(f"error: {path}: {what}; fix or remove that run directory")


def find_run_dirs(roots) -> list[Path]:
    """Every directory under ``roots`` holding ``metrics.jsonl`` and ``.hydra/config.yaml``, resolved and sorted."""
    found = set()
    for root in roots:
        for m in Path(root).rglob("metrics.jsonl"):
            if (m.parent / ".hydra" / "config.yaml").is_file():
                found.add(m.parent.resolve())
    return sorted(found)


def _read_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _bad_dir(path, f"line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise _bad_dir(path, f"line {n} is not a metrics row (a JSON object with an integer step)")
        rows.append(row)
    return rows


def _read_summary(path: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as e:
        raise _bad_dir(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if summary is not None and not isinstance(summary, dict):
        raise _bad_dir(path, "not a summary (a JSON object)")
    return summary


def read_run_dir(path: Path, name: str) -> RunRecord:
    """The record of the run directory ``path``, named ``name``; one error line for a damaged file."""
    path = Path(path)
    try:
        config = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=False)
    except Exception as e:
        raise _bad_dir(path / ".hydra" / "config.yaml", f"not a readable config ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise _bad_dir(path / ".hydra" / "config.yaml", "not a config (a YAML mapping)")
    op = path / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(op))] if op.is_file() else []
    summary = _read_summary(path / "summary.json")
    seed, env = config.get("seed"), (summary or {}).get("env")
    env = env if isinstance(env, dict) else None
    commit = (summary or {}).get("commit", (env or {}).get("commit"))
    return RunRecord(name=name, overrides=overrides, seed=seed if isinstance(seed, int) else None,
                     commit=commit if isinstance(commit, str) else None, env=env, config=config,
                     summary=summary, rows=_read_rows(path / "metrics.jsonl"))


def read_root(root: Path) -> list[RunRecord]:
    """The records of every run directory under ``root``, named by their paths relative to it."""
    root = Path(root).resolve()
    return [read_run_dir(p, p.relative_to(root).as_posix()) for p in find_run_dirs([root])]


def write_run_dir(rec: RunRecord, root: Path) -> Path:
    """``rec`` as the run directory ``root/<name>`` (which must not exist): the four files, as the trainer
    writes them."""
    path = Path(root) / rec.name
    if path.exists():
        raise InputError(f"error: {path} exists; unpack into a directory that does not hold these runs")
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(rec.config)))
    (path / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(rec.overrides)))
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rec.rows))
    if rec.summary is not None:
        (path / "summary.json").write_text(json.dumps(rec.summary, indent=1))
    return path


# ---------------------------------------------------------------------------------- data files
def _bad_file(path: Path, what: str) -> InputError:
    return InputError(f"error: {path}: {what}; re-pack it with python -m trb_exp.analysis.runstore pack ROOT {path}")


def write(records: list[RunRecord], out: Path) -> Path:
    """The data file ``out`` holding ``records`` (sorted by name; names unique), byte-stable."""
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        dup = sorted(n for n in set(names) if names.count(n) > 1)[0]
        raise InputError(f"error: run {dup!r} is given twice; pack each run once")
    lines = [json.dumps(HEADER, sort_keys=True)] + [r.to_json() for r in sorted(records, key=lambda r: r.name)]
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(("\n".join(lines) + "\n").encode())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return out


def pack(runs, out: Path) -> int:
    """Pack a root directory (every run directory under it) or a list of RunRecords into ``out``; the
    number of runs."""
    records = read_root(Path(runs)) if isinstance(runs, (str, Path)) else list(runs)
    if not records:
        raise InputError(f"error: no run (metrics.jsonl + .hydra/config.yaml) under {runs}; give a study's runs root")
    write(records, out)
    return len(records)


def _check_name(name, path: Path, n: int) -> str:
    p = PurePosixPath(name) if isinstance(name, str) else None
    if p is None or not name or p.is_absolute() or ".." in p.parts:
        raise _bad_file(path, f"line {n}: name {name!r} is not a relative run path")
    return name


def _record(obj, path: Path, n: int) -> RunRecord:
    """A data line as a RunRecord, each field's type checked."""
    if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise _bad_file(path, f"line {n} is not a run record (fields {', '.join(_FIELDS)}; got {got})")
    types = {"commit": (str, type(None)), "config": dict, "env": (dict, type(None)), "overrides": list,
             "rows": list, "seed": (int, type(None)), "summary": (dict, type(None))}
    for f, t in types.items():
        if not isinstance(obj[f], t) or isinstance(obj[f], bool):
            raise _bad_file(path, f"line {n}: field {f!r} has the wrong type ({type(obj[f]).__name__})")
    for k, row in enumerate(obj["rows"], 1):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise _bad_file(path, f"line {n}: row {k} is not a metrics row (a JSON object with an integer step)")
    _check_name(obj["name"], path, n)
    return RunRecord(**obj)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"error: {path}: no such data file "
                         f"(python -m trb_exp.analysis.runstore pack ROOT {path} makes one)")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise _bad_file(path, f"not a readable gzip file ({type(e).__name__}: {e})") from None


def load(path: Path) -> list[RunRecord]:
    """The runs of the data file ``path``; one error line (exit 2) for a damaged file or another version."""
    path = Path(path)
    lines = _lines(path)
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _bad_file(path, f"not a {FORMAT} data file (its first line is not {json.dumps(HEADER, sort_keys=True)})")
    if header.get("version") != VERSION:
        raise InputError(f"error: {path}: {FORMAT} version {header.get('version')!r}; this trb_exp reads version "
                         f"{VERSION}: use the trb_exp that wrote it, or re-pack the runs")
    records = []
    for n, line in enumerate(lines[1:], 2):
        try:
            records.append(_record(json.loads(line), path, n))
        except json.JSONDecodeError as e:
            raise _bad_file(path, f"line {n} is not valid JSON ({e.msg})") from None
    return records


def unpack(data: Path, out: Path) -> int:
    """Write every run of the data file ``data`` as a run directory under ``out``; the number of runs."""
    records = load(Path(data))
    there = next((Path(out) / r.name for r in records if (Path(out) / r.name).exists()), None)
    if there is not None:  # refuse before writing anything
        raise InputError(f"error: {there} exists; unpack into a directory that does not hold these runs")
    for rec in records:
        write_run_dir(rec, Path(out))
    return len(records)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m trb_exp.analysis.runstore", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="every run directory under ROOT -> the data file OUT")
    pk.add_argument("root", type=Path)
    pk.add_argument("out", type=Path)
    up = sub.add_parser("unpack", help="the runs of the data file DATA -> run directories under DIR")
    up.add_argument("data", type=Path)
    up.add_argument("dir", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "pack":
        if a.out.is_dir():
            raise InputError(f"error: OUT {a.out} is a directory; give the data file to write, "
                             f"e.g. {a.out}/runs.jsonl.gz")
        print(f"[runstore] {pack(a.root, a.out)} runs -> {a.out}", file=sys.stderr)
    else:
        print(f"[runstore] {unpack(a.data, a.dir)} runs -> {a.dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
