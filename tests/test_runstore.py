"""Runs as data (trb_exp.analysis.runstore): a study's runs in one versioned file, packed byte-stably,
unpacked to the run directories byte for byte, read by the analysis exactly as the directories are, and
every damaged or foreign file refused in one line."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trb_exp.analysis import runstore
from trb_exp.analysis.runs import load_runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def write_run(d: Path, method: str, seed: int, rows, summary=True, overrides=None):
    """A run directory written the way the trainer and Hydra write one."""
    (d / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "method": {"name": method, "topk": 16},
           "schedule": {"name": "linear", "eps0": 0.5, "warmup_steps": "${trainer.k}"}, "trainer": {"k": 10}}
    (d / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (d / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides or [f"seed={seed}"])))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (d / "summary.json").write_text(json.dumps({"method": method, "seed": seed, "train_s": 1.5}, indent=1))


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    rows = lambda v: [{"step": 0, "eval/pass@1": 0.0, "eval/pass@1_se": 0.01},
                      {"step": 1, "train/loss": 2.5, "trb/eps": 0.5, "time/step_s": 0.1},
                      {"step": 10, "eval/pass@1": v, "eval/pass@1_se": 0.02}]
    write_run(root / "sweep" / "trb" / "0_seed=0,x=1", "trb", 0, rows(0.25))
    write_run(root / "seeds" / "opd" / "1", "opd", 1, rows(1 / 3), overrides=["method=opd", "seed=1"])
    write_run(root / "seeds" / "opd" / "2", "opd", 2, rows(0.5), summary=False)  # unfinished
    return root


def test_pack_is_byte_stable_and_unpack_gives_the_files_back(runs_root, tmp_path):
    out = tmp_path / "a.jsonl.gz"
    assert runstore.pack(runs_root, out) == 3
    data = out.read_bytes()
    assert data[4:8] == b"\0\0\0\0"  # gzip mtime 0
    lines = gzip.decompress(data).decode().splitlines()
    assert json.loads(lines[0]) == {"format": "trb_exp.runs", "version": 1}
    names = [json.loads(line)["name"] for line in lines[1:]]
    assert names == ["seeds/opd/1", "seeds/opd/2", "sweep/trb/0_seed=0,x=1"]  # sorted, relative to the root
    rec = runstore.load(out)[0]
    assert (rec.seed, rec.overrides, rec.commit, rec.env) == (1, ["method=opd", "seed=1"], None, None)
    assert rec.config["schedule"]["warmup_steps"] == "${trainer.k}"  # as written, unresolved
    assert rec.rows[2] == {"step": 10, "eval/pass@1": 1 / 3, "eval/pass@1_se": 0.02}
    assert runstore.load(out)[1].summary is None
    assert runstore.unpack(out, tmp_path / "back") == 3
    assert files(tmp_path / "back") == files(runs_root)
    runstore.pack(tmp_path / "back", tmp_path / "b.jsonl.gz")
    assert (tmp_path / "b.jsonl.gz").read_bytes() == data


def test_a_data_file_loads_exactly_as_its_run_directories(runs_root, tmp_path):
    runstore.pack(runs_root, tmp_path / "runs.jsonl.gz")
    from_dirs, from_data = load_runs([runs_root]), load_runs([tmp_path / "runs.jsonl.gz"])
    fields = lambda r: (r.rel, r.method, r.seed, r.cfg, r.evals, r.train, r.summary, r.overridden, r.overrides)
    assert [fields(r) for r in from_data] == [fields(r) for r in from_dirs]
    assert from_data[2].rel == "sweep/trb/0_seed=0,x=1" and from_data[2].cfg["schedule.warmup_steps"] == 10
    assert from_data[0].evals == {0: {"eval/pass@1": 0.0, "eval/pass@1_se": 0.01},
                                  10: {"eval/pass@1": 1 / 3, "eval/pass@1_se": 0.02}}
    assert from_data[0].overridden == frozenset({"seed"})  # a group choice (method=opd) is no flat key


@pytest.mark.parametrize("study", ["mini/mini_b", "prelim_mini_a"])
def test_committed_data_files_unpack_and_repack_to_the_same_bytes(study, tmp_path):
    data = RESULTS / study / "runs.jsonl.gz"
    n = runstore.unpack(data, tmp_path / "runs")
    assert n == len(list((tmp_path / "runs").rglob("metrics.jsonl"))) > 0
    runstore.pack(tmp_path / "runs", tmp_path / "again.jsonl.gz")
    assert (tmp_path / "again.jsonl.gz").read_bytes() == data.read_bytes()


def _gz(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return path


def test_damaged_or_foreign_files_are_one_line_errors(runs_root, tmp_path):
    good = tmp_path / "good.jsonl.gz"
    runstore.pack(runs_root, good)
    fix = "; re-pack it with python -m trb_exp.analysis.runstore pack ROOT "
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(good.read_bytes()[:200])
    cases = {
        cut: f"error: {cut}: not a readable gzip file (EOFError: Compressed file ended before the end-of-stream "
             f"marker was reached){fix}{cut}",
        (p := _gz(tmp_path / "v2.gz", '{"format": "trb_exp.runs", "version": 2}\n')):
            f"error: {p}: trb_exp.runs version 2; this trb_exp reads version 1: use the trb_exp that wrote it, "
            "or re-pack the runs",
        (p := _gz(tmp_path / "other.gz", '{"rows": []}\n')):
            f'error: {p}: not a trb_exp.runs data file (its first line is not {{"format": "trb_exp.runs", '
            f'"version": 1}}){fix}{p}',
        (p := _gz(tmp_path / "field.gz", '{"format": "trb_exp.runs", "version": 1}\n{"name": "a"}\n')):
            f"error: {p}: line 2 is not a run record (fields commit, config, env, name, overrides, rows, seed, "
            f"summary; got ['name']){fix}{p}",
        (p := tmp_path / "missing.jsonl.gz"):
            f"error: {p}: no such data file (python -m trb_exp.analysis.runstore pack ROOT {p} makes one)",
    }
    plain = tmp_path / "plain.gz"
    plain.write_text("not gzip")
    with pytest.raises(SystemExit) as e:
        runstore.load(plain)
    assert str(e.value).startswith(f"error: {plain}: not a readable gzip file (BadGzipFile")
    for path, message in cases.items():
        with pytest.raises(SystemExit) as e:
            runstore.load(path)
        assert str(e.value) == message and e.value.code == 2
    rec = json.loads(gzip.decompress(good.read_bytes()).decode().splitlines()[1])
    for field, value, what in (("name", "../escape", "line 2: name '../escape' is not a relative run path"),
                               ("seed", "0", "line 2: field 'seed' has the wrong type (str)"),
                               ("rows", [{"step": 1.5}], "line 2: row 1 is not a metrics row (a JSON object with an "
                                                         "integer step)")):
        p = _gz(tmp_path / f"bad_{field}.gz", '{"format": "trb_exp.runs", "version": 1}\n'
                + json.dumps({**rec, field: value}) + "\n")
        with pytest.raises(SystemExit, match=None) as e:
            runstore.load(p)
        assert str(e.value) == f"error: {p}: {what}{fix}{p}"


def test_unpack_never_touches_an_existing_run(runs_root, tmp_path):
    runstore.pack(runs_root, tmp_path / "d.jsonl.gz")
    (tmp_path / "out" / "sweep" / "trb" / "0_seed=0,x=1").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        runstore.unpack(tmp_path / "d.jsonl.gz", tmp_path / "out")
    assert str(e.value) == (f"error: {tmp_path / 'out' / 'sweep' / 'trb' / '0_seed=0,x=1'} exists; unpack into a "
                            "directory that does not hold these runs")
    assert files(tmp_path / "out") == {} and not (tmp_path / "out" / "seeds").exists()  # nothing written
    with pytest.raises(SystemExit, match="no run .* under .*nothing; give a study's runs root"):
        runstore.pack(tmp_path / "nothing", tmp_path / "e.jsonl.gz")


@pytest.mark.slow
def test_cli_packs_unpacks_and_refuses_in_one_line(runs_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = lambda *a: subprocess.run([sys.executable, "-m", "trb_exp.analysis.runstore", *map(str, a)],
                                    capture_output=True, text=True, env=env, cwd=tmp_path)
    p = cli("pack", runs_root, "d.jsonl.gz")
    assert p.returncode == 0 and p.stderr == "[runstore] 3 runs -> d.jsonl.gz\n"
    p = cli("unpack", "d.jsonl.gz", "back")
    assert p.returncode == 0 and files(tmp_path / "back") == files(runs_root)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b garbage")
    p = cli("unpack", "bad.jsonl.gz", "x")
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith("error: bad.jsonl.gz: not a readable gzip file") and not (tmp_path / "x").exists()
