"""Verified checkpoints (issue 22): every checkpoint carries the size and SHA-256 of its files
(``checksums.json``, written before the rename that publishes it). ``trainer.resume=auto`` skips a damaged
one with one warning line naming the file and what is wrong and continues from the next older intact one;
none intact is one line (exit 2 through the CLI) unless ``trainer.resume_fallback=scratch``;
``trainer.resume=PATH`` on a damaged checkpoint is one line naming the damaged file."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose
from test_checkpoint_resume import ARGS, _pair, _rows, _same_weights, _StopAfter

from trb_exp.config import ConfigError
from trb_exp.run.preempt import Stopped
from trb_exp.run.resume import resume_from
from trb_exp.run.state import CHECKSUMS_FILE, list_checkpoints, verify_checkpoint
from trb_exp.trainer import run

SHORT = [*ARGS, "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.eval_every=0"]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_pair, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, as if preempted after step 4 (no summary.json)."""
    d = tmp_path_factory.mktemp("two") / "run"
    run(compose([*SHORT, *_pair(tiny_pair)]), d)
    (d / "summary.json").unlink()
    assert [p.name for p in list_checkpoints(d / "checkpoints")] == ["step_2", "step_4"]
    return d


def _files(ckpt: Path) -> list[str]:
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())


def _damage(f: Path, how: str) -> None:
    data = f.read_bytes()
    if how == "empty":
        f.write_bytes(b"")
    elif how == "truncated":
        f.write_bytes(data[: len(data) // 2])
    else:  # one byte flipped in the middle: same size
        i = len(data) // 2
        f.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])


def test_checksums_cover_every_file_and_an_intact_checkpoint_verifies(two_checkpoints):
    ckpt = two_checkpoints / "checkpoints" / "step_4"
    table = json.loads((ckpt / CHECKSUMS_FILE).read_text())
    assert sorted(table) == [f for f in _files(ckpt) if f != CHECKSUMS_FILE]
    assert {"state.pt", "student/model.safetensors", "student/config.json"} <= set(table)
    import hashlib

    assert table["state.pt"] == {"bytes": (ckpt / "state.pt").stat().st_size,
                                 "sha256": hashlib.sha256((ckpt / "state.pt").read_bytes()).hexdigest()}
    assert verify_checkpoint(ckpt) is None


REASONS = {
    "empty": "{n} bytes where {size} were written (truncated or overwritten)",
    "truncated": "{n} bytes where {size} were written (truncated or overwritten)",
    "flipped": "its SHA-256 differs from the one written with it (the file is damaged)",
}


@pytest.mark.parametrize("how", ["empty", "truncated", "flipped"])
def test_each_damaged_file_of_the_newest_checkpoint_falls_back_to_the_older_one(how, two_checkpoints, tiny_pair,
                                                                                tmp_path, capsys):
    cfg = compose([*SHORT, *_pair(tiny_pair)])
    names = _files(two_checkpoints / "checkpoints" / "step_4")
    assert len(names) >= 6  # state.pt, checksums.json, the student's weights, config and tokenizer files
    for name in names:
        d = tmp_path / name.replace("/", "_")
        shutil.copytree(two_checkpoints, d)
        newest, older = d / "checkpoints" / "step_4", d / "checkpoints" / "step_2"
        size = (newest / name).stat().st_size
        _damage(newest / name, how)
        n = (newest / name).stat().st_size
        capsys.readouterr()
        assert resume_from(cfg, d) == older, name
        reason = ("not a valid checksum table (empty, truncated or garbled)" if name == CHECKSUMS_FILE
                  else REASONS[how].format(n=n, size=size))
        assert capsys.readouterr().err.splitlines() == [
            f"[resume] warning: skipping checkpoint {newest}: {name}: {reason}"], name
        # trainer.resume=PATH names the damaged file in one line
        with pytest.raises(ConfigError) as e:
            resume_from(compose([*SHORT, *_pair(tiny_pair), f"trainer.resume={newest}"]), tmp_path / "fork")
        assert str(e.value) == (f"trainer.resume='{newest}': {newest / name}: {reason}; resume from another "
                                "checkpoint (an older step_<k> beside it)")
        assert not (tmp_path / "fork").exists()


def test_a_checkpoint_that_lost_its_checksums_is_damaged(two_checkpoints, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(two_checkpoints, d)
    ckpt = d / "checkpoints" / "step_4"
    (ckpt / CHECKSUMS_FILE).unlink()
    assert verify_checkpoint(ckpt) == (ckpt / CHECKSUMS_FILE, "missing (this checkpoint was written with one)")


def test_no_intact_checkpoint_is_one_line_unless_a_fresh_start_is_allowed(two_checkpoints, tiny_pair, tmp_path,
                                                                          capsys):
    d = tmp_path / "run"
    shutil.copytree(two_checkpoints, d)
    for k in (2, 4):
        _damage(d / "checkpoints" / f"step_{k}" / "state.pt", "empty")
    size = (two_checkpoints / "checkpoints" / "step_4" / "state.pt").stat().st_size
    with pytest.raises(ConfigError) as e:
        resume_from(compose([*SHORT, *_pair(tiny_pair)]), d)
    assert str(e.value) == (f"trainer.resume=auto: no intact checkpoint in {d / 'checkpoints'} (newest: "
                            f"{d / 'checkpoints' / 'step_4' / 'state.pt'}: 0 bytes where {size} were written "
                            "(truncated or overwritten)); set trainer.resume_fallback=scratch to start the run afresh")
    capsys.readouterr()
    assert resume_from(compose([*SHORT, *_pair(tiny_pair), "trainer.resume_fallback=scratch"]), d) is None
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"[resume] warning: no intact checkpoint in {d / 'checkpoints'}; trainer.resume_fallback=scratch: "
        "starting the run afresh")
    with pytest.raises(ConfigError, match=r"^trainer.resume_fallback='never': use fail \(no intact checkpoint: "):
        resume_from(compose([*SHORT, *_pair(tiny_pair), "trainer.resume_fallback=never"]), d)


def test_legacy_checkpoint_without_checksums_is_checked_by_loading(two_checkpoints, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(two_checkpoints, d)
    ckpt = d / "checkpoints" / "step_4"
    (ckpt / CHECKSUMS_FILE).unlink()
    payload = torch.load(ckpt / "state.pt", weights_only=True)
    payload.pop("checksummed")
    torch.save(payload, ckpt / "state.pt")  # as written before checksums
    assert verify_checkpoint(ckpt) is None
    _damage(ckpt / "student" / "model.safetensors", "truncated")
    bad = verify_checkpoint(ckpt)
    assert bad[0] == ckpt / "student" / "model.safetensors" and bad[1].startswith("does not load (SafetensorError: ")
    _damage(ckpt / "state.pt", "truncated")
    bad = verify_checkpoint(ckpt)
    assert bad[0] == ckpt / "state.pt" and bad[1].startswith("does not load (")


@pytest.mark.slow  # two 8-step runs
def test_damaged_newest_checkpoint_of_an_interrupted_run_resumes_from_the_older_one(tiny_pair, tmp_path, capsys):
    """Stopped after step 6 (checkpoints 3 and 6), its step-6 state.pt truncated: trainer.resume=auto continues
    from step 3, and the run's record and weights equal those of the uninterrupted run."""
    args = [*ARGS, *_pair(tiny_pair), "trainer.max_steps=8", "trainer.checkpoint_every=3", "trainer.eval_every=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(compose(args), full)
    with pytest.raises(Stopped):
        run(compose(args), part, stop=_StopAfter(part, 6))
    assert [c.name for c in list_checkpoints(part / "checkpoints")] == ["step_3", "step_6"]
    _damage(part / "checkpoints" / "step_6" / "state.pt", "truncated")
    capsys.readouterr()
    run(compose(args), part)
    out, err = capsys.readouterr()
    assert f"[resume] warning: skipping checkpoint {part / 'checkpoints' / 'step_6'}: state.pt: " in err
    assert f"[resume] {part / 'checkpoints' / 'step_3'} (step 3 of 8)" in out
    assert _rows(part) == _rows(full) and _same_weights(part, full)
