"""Faults a new user meets (issue 22), one row each: the exact line, the exit code (through the CLI for the
rows marked slow), and that no stray directory or other run's file is left. The rows of issue 10 are in
``test_bad_input_table.py``; verified checkpoints are tested file by file in ``test_checkpoint_verify.py``."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compose, wait_until

from trb_exp.config import ConfigError
from trb_exp.trainer import run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.max_steps=1", "trainer.eval_size=4", "trainer.eval_samples=1",
        "trainer.prompts_per_step=2", "trainer.max_new_tokens=4", "threads=1", "device=cpu", "trainer.progress=false"]


def _pair(tiny_pair):
    return [f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault_data")
    (d / "good.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": "4"}\n')
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "1+2=", "answer": "3"}\n{"prompt": "caf\xe9 2+2=", "answer": "4"}\n')
    (d / "three.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n\n{"prompt": "2+2=", "answer": "three"}\n')
    (d / "nan.jsonl").write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": NaN}\n')
    (d / "nan_text.jsonl").write_text('{"prompt": "1+2=", "answer": "nan"}\n')
    return d


def _local(d, train, *more):
    return ["dataset=local", f"dataset.train_file={d / train}", f"dataset.test_file={d / 'good.jsonl'}", *more]


# (file, extra overrides, the exact message); {f} is the file's path
DATA_ROWS = [
    ("latin1.jsonl", (), "dataset.train_file='{f}': line 2 is not UTF-8 text (byte 0xe9 at column 16); save the file "
                         "as UTF-8"),
    ("three.jsonl", (), "dataset.train_file='{f}': line 3: answer 'three' can never be graded; the exact grader "
                        "compares integers: give an integer answer, or dataset.grader=math"),
    ("three.jsonl", ("dataset.grader=math",),
     "dataset.train_file='{f}': line 3: answer 'three' can never be graded; math-verify reads a bare word as a "
     "product of one-letter symbols (t*h*r*e*e), which no response will match: give the answer as a number or "
     "expression (e.g. 3)"),
    ("nan.jsonl", (), "dataset.train_file='{f}': line 2 has an empty or non-text 'prompt'/'answer'"),
    ("nan_text.jsonl", ("dataset.grader=math",),
     "dataset.train_file='{f}': line 1: answer 'nan' can never be graded; math-verify cannot parse it as a number "
     "or expression: give the final answer (e.g. 42 or \\frac{{1}}{{2}})"),
]


@pytest.mark.parametrize("name, extra, message", DATA_ROWS, ids=[" ".join([r[0], *r[1]]) for r in DATA_ROWS])
def test_data_row_is_one_line_naming_file_and_line(name, extra, message, data, tiny_pair, tmp_path, no_model_load):
    with pytest.raises(ConfigError) as e:
        run(compose([*FAST, *_pair(tiny_pair), *_local(data, name, *extra)]), tmp_path / "run")
    assert str(e.value) == message.format(f=data / name)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- through the CLI
def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "trb_exp.train", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=cwd)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.slow
def test_cli_data_row_exit_2_and_no_directory(data, tiny_pair, tmp_path):
    name, extra, message = DATA_ROWS[0]
    r = _cli(*FAST, *_pair(tiny_pair), *_local(data, name, *extra), f"hydra.run.dir={tmp_path / 'runs' / 'x'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: " + message.format(f=data / name)
    assert "Traceback" not in r.stderr + r.stdout and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- signals from the first instant
def _start(*args, module="trb_exp.train"):
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (``SigCgt`` of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


STARTUP = {"SIGINT": (130, "[interrupted] stopped during start-up: nothing to save yet"),
           **{s: (75, f"[{s}] stopped during start-up: nothing to save yet; exit 75 (rerun the same command to "
                      "start the run)") for s in ("SIGTERM", "SIGUSR1", "SIGHUP")}}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads SigCgt from /proc (Linux)")
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_during_the_imports_is_one_line_and_no_run_dir(signame, tiny_pair, tmp_path):
    """As soon as the process can catch the signal (its first lines, before torch, transformers or Hydra are
    imported): the documented exit code, one line, no traceback and no run directory."""
    proc = _start(*FAST, *_pair(tiny_pair), f"hydra.run.dir={tmp_path / 'runs' / 'x'}")
    wait_until(proc, lambda: _catches(proc.pid, signal.SIGTERM))
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    code, line = STARTUP[signame]
    assert proc.returncode == code and err.strip().splitlines() == [line], err
    assert "Traceback" not in out + err and not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signame, when", [("SIGHUP", "run dir"), ("SIGTERM", "accepted")])
def test_signal_during_setup_exits_75_with_a_step_0_checkpoint_or_nothing_to_save(signame, when, tiny_pair,
                                                                                 tmp_path):
    """Just after Hydra made the run directory (the imports of the trainer are still going on), or once the
    run was accepted (.hydra/ written; the models load): exit 75 and one line, either nothing to save (and
    no run directory) or the step-0 checkpoint, intact."""
    from trb_exp.run.state import verify_checkpoint

    run_dir = tmp_path / "runs" / "x"
    proc = _start(*FAST, *_pair(tiny_pair), "trainer.max_steps=50", f"hydra.run.dir={run_dir}")
    wait_until(proc, lambda: (run_dir / ".hydra").exists() if when == "accepted" else run_dir.exists())
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=240)
    lines = err.strip().splitlines()
    assert proc.returncode == 75 and "Traceback" not in out + err, err
    ckpt = run_dir / "checkpoints" / "step_0"
    if lines == [STARTUP[signame][1]]:
        assert when == "run dir" and not (tmp_path / "runs").exists()
    else:
        assert lines[-1] == f"[{signame}] checkpoint {ckpt}; exit 75 (rerun the same command to resume)", err
        assert verify_checkpoint(ckpt) is None and not (run_dir / "summary.json").exists()
        assert sorted(p.name for p in run_dir.iterdir()) == [
            ".hydra", "checkpoints", "metrics.jsonl", "train.log"]


@pytest.mark.slow
def test_sighup_during_training_checkpoints_and_exits_75(tiny_pair, tmp_path):
    from trb_exp.run.state import list_checkpoints

    run_dir = tmp_path / "run"
    proc = _start(*FAST, *_pair(tiny_pair), "trainer.max_steps=200", "trainer.eval_every=0",
                  f"hydra.run.dir={run_dir}")
    wait_until(proc, lambda: (run_dir / "metrics.jsonl").exists() and '"train/loss"' in (run_dir / "metrics.jsonl").read_text())
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=240)
    (ckpt,) = list_checkpoints(run_dir / "checkpoints")
    assert proc.returncode == 75 and err.strip().splitlines()[-1] == \
        f"[SIGHUP] checkpoint {ckpt}; exit 75 (rerun the same command to resume)", err


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads SigCgt from /proc (Linux)")
@pytest.mark.parametrize("signame, when", [("SIGTERM", "imports"), ("SIGINT", "run dir")])
def test_signal_during_an_evaluation_is_one_line_and_no_directory(signame, when, tiny_pair, tmp_path):
    """``trb_exp.evaluate`` from its first instant: an evaluation writes nothing until it has finished, so a
    stop signal (during its imports, or once Hydra made its directory) is one line, exit 75 / 130, and no
    directory is left."""
    out_dir = tmp_path / "evals" / "x"
    proc = _start(f"model.student={tiny_pair / 'student'}", "dataset=arithmetic", "eval.max_new_tokens=8",
                  "eval.samples=64", "threads=1", f"hydra.run.dir={out_dir}", module="trb_exp.evaluate")
    wait_until(proc, lambda: _catches(proc.pid, signal.SIGTERM) if when == "imports" else out_dir.exists())
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    code = 130 if signame == "SIGINT" else 75
    tag = "interrupted" if signame == "SIGINT" else signame
    assert proc.returncode == code and err.strip().splitlines()[-1] == \
        f"[{tag}] evaluation stopped before it finished: nothing written; exit {code} (rerun the same command)", err
    assert "Traceback" not in out + err and not (tmp_path / "evals").exists()


# --------------------------------------------------------------------------- prepare --out
@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "file", "unwritable"])
def test_prepare_out_refuses_in_the_first_second(case, tmp_path):
    """Before torch is imported (the training would take minutes): one line, exit 2, nothing created."""
    out = {"full": tmp_path / "full", "file": tmp_path / "afile", "unwritable": tmp_path / "ro" / "pair"}[case]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "teacher").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ro").mkdir(mode=0o555)
    if case == "unwritable" and os.geteuid() == 0:
        out = Path("/proc/trb_exp_out/pair")  # root writes anywhere a mode allows: a file system that refuses
    before = _tree(tmp_path)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "trb_exp.prepare", "--out", str(out)], capture_output=True, text=True,
                       env=_env(), cwd=ROOT, timeout=60)
    took = time.time() - t0
    line = {"full": f"error: --out {out}: the directory exists and holds files, which would be overwritten; give a "
                    "new directory (it is created) or an empty one",
            "file": f"error: --out {out}: a file is there; give a directory (it is created if missing)"}.get(case)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    if line is not None:
        assert r.stderr.strip() == line
    else:
        assert r.stderr.startswith(f"error: --out {out}: cannot write there (") and \
            r.stderr.strip().endswith("); give a writable directory")
    assert took < 5, took  # about 0.2 s; 5 s leaves room for a loaded machine (torch alone takes longer)
    assert _tree(tmp_path) == before and "torch" not in r.stderr


# --------------------------------------------------------------------------- start-up: unreadable files
@pytest.fixture(scope="module")
def broken(tiny_pair, tmp_path_factory):
    """Copies of the tiny pair's models, each with one damaged file."""
    d = tmp_path_factory.mktemp("broken")
    for name, role, file, how in [("trunc_weights", "student", "model.safetensors", "half"),
                                  ("junk_weights", "teacher", "model.safetensors", "junk"),
                                  ("bad_tokenizer", "student", "tokenizer.json", "half"),
                                  ("bad_config", "teacher", "config.json", "half")]:
        shutil.copytree(tiny_pair / role, d / name)
        f = d / name / file
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if how == "half" else b"\x00junk" * 64)
    return d


def _why(f: Path) -> str:
    import json

    try:
        json.loads(f.read_text())
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{f} parses")


# (role, broken copy, the exact message); {d}: the broken copies' directory
FILE_ROWS = [
    ("student", "trunc_weights", "model.student: {d}/trunc_weights/model.safetensors is not a complete safetensors "
                                 "file (Error while deserializing header: incomplete metadata, file not fully "
                                 "covered); it is damaged or was not fully written (a half-finished download?): "
                                 "download or save it again"),
    ("teacher", "junk_weights", "model.teacher: {d}/junk_weights/model.safetensors is not a complete safetensors "
                                "file (Error while deserializing header: header too large); it is damaged or was "
                                "not fully written (a half-finished download?): download or save it again"),
    ("student", "bad_tokenizer", "model.student: {d}/bad_tokenizer/tokenizer.json is not valid JSON ({why}); the "
                                 "file is damaged or was not fully written: save or download it again"),
    ("teacher", "bad_config", "model.teacher: {d}/bad_config/config.json is not valid JSON ({why}); the file is "
                              "damaged or was not fully written: save or download it again"),
]


@pytest.mark.parametrize("role, copy, message", FILE_ROWS, ids=[r[1] for r in FILE_ROWS])
def test_unreadable_model_file_is_one_line_naming_it(role, copy, message, broken, tiny_pair, tmp_path):
    pair = {"student": tiny_pair / "student", "teacher": tiny_pair / "teacher", role: broken / copy}
    cfg = compose([*FAST, f"model.student={pair['student']}", f"model.teacher={pair['teacher']}"])
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path / "run")
    bad = {"bad_tokenizer": "tokenizer.json", "bad_config": "config.json"}.get(copy)
    assert str(e.value) == message.format(d=broken, why=_why(broken / copy / bad) if bad else "")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_unreadable_weights_exit_2_and_no_run_dir(broken, tiny_pair, tmp_path):
    """Through the CLI: one line, exit 2, and neither the run directory nor Hydra's train.log is left."""
    other = tmp_path / "runs" / "other"
    other.mkdir(parents=True)
    (other / "metrics.jsonl").write_text('{"step": 0}\n')  # another run's file beside it: untouched
    r = _cli(*FAST, f"model.student={broken / 'trunc_weights'}", f"model.teacher={tiny_pair / 'teacher'}",
             f"hydra.run.dir={tmp_path / 'runs' / 'x'}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: " + FILE_ROWS[0][2].format(d=broken)
    assert "Traceback" not in r.stderr + r.stdout
    assert _tree(tmp_path / "runs") == ["other", "other/metrics.jsonl"]
    assert (other / "metrics.jsonl").read_text() == '{"step": 0}\n'


# --------------------------------------------------------------------------- keys nobody reads
KEY_ROWS = [
    ("+trainer.max_step=5", "trainer.max_step: no such setting, so nothing would read it; did you mean "
                            "trainer.max_steps?"),
    ("trainer.max_step=5", "trainer.max_step: no such setting, so nothing would read it; did you mean "
                           "trainer.max_steps?"),
    ("+foo=1", "foo: no such setting, so nothing would read it; see conf/config.yaml for the settings"),
    ("+rollout.engin=eager", "rollout.engin: no such setting, so nothing would read it; did you mean rollout.engine?"),
    ("++seeds=3", "seeds: no such setting, so nothing would read it; did you mean seed?"),
]


@pytest.mark.parametrize("override, message", KEY_ROWS, ids=[r[0] for r in KEY_ROWS])
def test_a_key_nobody_reads_is_refused_with_the_nearest(override, message):
    from trb_exp.keys import check_keys, check_overrides

    with pytest.raises(ConfigError) as e:
        check_overrides(["logger=none", override, "hydra.run.dir=x"])
    assert str(e.value) == message
    if override.startswith("+"):  # composed (in process: train.run validates it)
        with pytest.raises(ConfigError) as e:
            check_keys(compose(["logger=none", override]))
        assert str(e.value) == message


@pytest.mark.parametrize("overrides", [[], ["experiment=mini_a"], ["experiment=paper_0.6b_4b"], ["model=hf"],
                                       ["method=veto", "schedule=gap"], ["dataset=local"], ["dataset=math_train"],
                                       ["+model.chat_template_kwargs.enable_thinking=false"],
                                       ["+dataset.data_files.train=x.jsonl"], ["+method.anything=1"],
                                       ["dataset=openthoughts3", "+dataset.filter.domain=math"]])
def test_every_shipped_config_and_the_free_form_keys_pass(overrides):
    from trb_exp.keys import check_keys, check_overrides

    check_overrides(overrides)
    check_keys(compose(overrides))


@pytest.mark.slow
def test_cli_unknown_key_exit_2_before_anything(tmp_path):
    r = _cli("+trainer.max_step=5", f"hydra.run.dir={tmp_path / 'runs' / 'x'}", timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: " + KEY_ROWS[0][1]], r.stderr
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- booleans where a number is expected
BOOL_ROWS = [
    ("trainer.max_steps=true", "trainer.max_steps=true: a boolean where an integer is expected; give an integer, "
                               "e.g. trainer.max_steps=400"),
    ("optim.lr=false", "optim.lr=false: a boolean where a number is expected; give a number, e.g. optim.lr=0.001"),
    ("trainer.eval_size=true", "trainer.eval_size=true: true/false is not a value this key takes; see its comment in "
                               "conf/config.yaml"),
    ("seed=true", "seed=true: a boolean where an integer is expected; give an integer, e.g. seed=0"),
]


@pytest.mark.parametrize("override, message", BOOL_ROWS, ids=[r[0] for r in BOOL_ROWS])
def test_a_boolean_where_a_number_is_expected_is_refused(override, message):
    from trb_exp.keys import check_keys

    with pytest.raises(ConfigError) as e:
        check_keys(compose(["logger=none", override]))
    assert str(e.value) == message
    check_keys(compose(["logger=none", "trainer.progress=false", "rollout.compile=true"]))  # real booleans pass


# --------------------------------------------------------------------------- prompt + max_new_tokens
def test_prompt_plus_max_new_tokens_beyond_the_positions_is_refused_or_clipped(capsys):
    from trb_exp.data import check_prompts
    from trb_exp.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    prompts = ["1+2=", "12+34*5="]  # 5 and 9 tokens with <bos>
    assert check_prompts(tok, prompts, "dataset (arithmetic, training prompts)", 128, 119) == 119
    with pytest.raises(ConfigError) as e:
        check_prompts(tok, prompts, "dataset (arithmetic, training prompts)", 128, 120)
    assert str(e.value) == ("trainer.max_new_tokens=120: dataset (arithmetic, training prompts): prompt 1 is 9 "
                            "tokens, and 9 + 120 = 129 is beyond the student's 128 positions (max_position_embeddings); "
                            "give trainer.max_new_tokens=119 or less, or trainer.clip_max_new_tokens=true to clip it")
    capsys.readouterr()
    assert check_prompts(tok, prompts, "dataset (arithmetic, training prompts)", 128, 100000, clip=True) == 119
    assert capsys.readouterr().err.splitlines() == [
        "[warning] trainer.max_new_tokens=100000 clipped to 119: dataset (arithmetic, training prompts): prompt 1 is "
        "9 tokens of the student's 128 positions"]


# --------------------------------------------------------------------------- damaged checkpoints, through the CLI
@pytest.mark.slow
def test_cli_damaged_checkpoints(tiny_pair, tmp_path):
    """A run stopped after step 2 (checkpoints 1 and 2): resume=PATH on the damaged newest is exit 2 naming the
    file; with every checkpoint damaged resume=auto is exit 2 and the run dir is left exactly as it was."""
    run_dir = tmp_path / "run"
    args = [*FAST, *_pair(tiny_pair), "trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=0",
            "trainer.eval_every=0"]
    r = _cli(*args, f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    (run_dir / "summary.json").unlink()  # as if preempted after step 2
    newest, older = run_dir / "checkpoints" / "step_2", run_dir / "checkpoints" / "step_1"
    size = (newest / "state.pt").stat().st_size
    (newest / "state.pt").write_bytes(b"")
    r = _cli(*args, f"trainer.resume={newest}", f"hydra.run.dir={tmp_path / 'fork'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: trainer.resume='{newest}': {newest / 'state.pt'}: 0 bytes where {size} were written (truncated or "
        "overwritten); resume from another checkpoint (an older step_<k> beside it)"), r.stderr
    assert not (tmp_path / "fork").exists()
    (older / "student" / "model.safetensors").write_bytes(b"\0" * 10)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    r = _cli(*args, f"hydra.run.dir={run_dir}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines[-3].startswith(f"[resume] warning: skipping checkpoint {newest}: state.pt: 0 bytes where ")
    assert lines[-2].startswith(f"[resume] warning: skipping checkpoint {older}: student/model.safetensors: 10 bytes")
    assert lines[-1] == (f"error: trainer.resume=auto: no intact checkpoint in {run_dir / 'checkpoints'} (newest: "
                         f"{newest / 'state.pt'}: 0 bytes where {size} were written (truncated or overwritten)); set "
                         "trainer.resume_fallback=scratch to start the run afresh")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing touched


# --------------------------------------------------------------------------- the same rows through trainer.run
RUN_ROWS = [
    ("trainer.max_steps=true", BOOL_ROWS[0][1]),
    ("+trainer.max_step=5", KEY_ROWS[0][1]),
    ("schedule.eps0=true", "schedule.eps0=true: a boolean where a number is expected; give a number, e.g. "
                           "schedule.eps0=0.5"),
    ("trainer.max_new_tokens=100000",
     "trainer.max_new_tokens=100000: dataset (arithmetic, training prompts): prompt {i} is {n} tokens, and {n} + 100000 = "
     "{total} is beyond the student's 128 positions (max_position_embeddings); give trainer.max_new_tokens={room} or "
     "less, or trainer.clip_max_new_tokens=true to clip it"),
]


def test_the_teacher_with_fewer_positions_sets_the_length_limit(tiny_pair, tmp_path, no_model_load):
    """The teacher scores every position the student samples: prompt + max_new_tokens must fit the shorter
    of the two models, and the line names which one."""
    import json

    short = tmp_path / "short_teacher"
    shutil.copytree(tiny_pair / "teacher", short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    cfg = compose([*FAST, f"model.student={tiny_pair / 'student'}", f"model.teacher={short}",
                   "trainer.max_new_tokens=60"])
    i, n = _longest_train_prompt(cfg)
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path / "run")
    assert str(e.value) == (f"trainer.max_new_tokens=60: dataset (arithmetic, training prompts): prompt {i} is {n} "
                            f"tokens, and {n} + 60 = {n + 60} is beyond the teacher's 64 positions "
                            f"(max_position_embeddings); give trainer.max_new_tokens={64 - n} or less, or "
                            "trainer.clip_max_new_tokens=true to clip it")
    assert not (tmp_path / "run").exists()


def _eval_cfg(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trb_exp import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("evaluate", overrides=list(overrides))


def test_evaluate_refuses_or_clips_a_length_beyond_the_positions(tiny_pair, tmp_path, capsys):
    """``trb_exp.evaluate``: the default eval.max_new_tokens (7168, for hub models) on a 128-position student
    is refused with the numbers before the model loads, or clipped with one warning line on request."""
    from trb_exp.data import load_task
    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.experiment import setup_eval

    base = [f"model.student={tiny_pair / 'student'}", "dataset=arithmetic", "threads=1"]
    ids = build_char_tokenizer()(load_task(_eval_cfg(*base).dataset).test_prompts)["input_ids"]
    i = max(range(len(ids)), key=lambda j: len(ids[j]))
    n = len(ids[i])
    with pytest.raises(ConfigError) as e:
        setup_eval(_eval_cfg(*base))
    assert str(e.value) == (f"eval.max_new_tokens=7168: benchmark arithmetic: prompt {i} is {n} tokens, and {n} + "
                            f"7168 = {n + 7168} is beyond the student's 128 positions (max_position_embeddings); "
                            f"give eval.max_new_tokens={128 - n} or less, or eval.clip_max_new_tokens=true to clip it")
    cfg = _eval_cfg(*base, "eval.clip_max_new_tokens=true")
    capsys.readouterr()
    setup_eval(cfg)
    assert cfg.eval.max_new_tokens == 128 - n
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("[warning]")] == [
        f"[warning] eval.max_new_tokens=7168 clipped to {128 - n}: benchmark arithmetic: prompt {i} is {n} tokens of "
        "the student's 128 positions"]


def _longest_train_prompt(cfg):
    from trb_exp.data import load_task
    from trb_exp.data.tokenizer import build_char_tokenizer

    ids = build_char_tokenizer()(load_task(cfg.dataset).train_prompts)["input_ids"]
    i = max(range(len(ids)), key=lambda j: len(ids[j]))
    return i, len(ids[i])


@pytest.mark.parametrize("override, message", RUN_ROWS, ids=[r[0] for r in RUN_ROWS])
def test_run_refuses_before_any_model_loads(override, message, tiny_pair, tmp_path, no_model_load):
    cfg = compose([*FAST, *_pair(tiny_pair), override])
    i, n = _longest_train_prompt(cfg)
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path / "run")
    assert str(e.value) == message.format(i=i, n=n, total=n + 100000, room=128 - n)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # trains a step with clipped lengths
def test_clip_max_new_tokens_clips_with_one_warning_line(tiny_pair, tmp_path, capsys):
    cfg = compose([*FAST, *_pair(tiny_pair), "trainer.max_new_tokens=100000", "trainer.clip_max_new_tokens=true"])
    i, n = _longest_train_prompt(cfg)
    summary = run(cfg, tmp_path / "run")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[warning]")]
    assert warnings == [f"[warning] trainer.max_new_tokens=100000 clipped to {128 - n}: dataset (arithmetic, training "
                        f"prompts): prompt {i} is {n} tokens of the student's 128 positions"]
    assert summary["steps"] == 1 and cfg.trainer.max_new_tokens == 128 - n


@pytest.mark.slow
@pytest.mark.parametrize("override, message", RUN_ROWS[:1], ids=["max_steps=true"])
def test_cli_boolean_exit_2_and_no_run_dir(override, message, tiny_pair, tmp_path):
    r = _cli(*FAST, *_pair(tiny_pair), override, f"hydra.run.dir={tmp_path / 'runs' / 'x'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: " + message, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()
