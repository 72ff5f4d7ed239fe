"""``trb_exp.evaluate run=<run dir>`` (issue 22): a training run is scored with its own student, prompt
format, task, benchmarks and length limit (``run/saved.py``), and what the command line sets wins."""

import json
from pathlib import Path

import pytest
from conftest import CONF_DIR, compose
from omegaconf import OmegaConf

from trb_exp.config import ConfigError
from trb_exp.run.saved import evaluation_config, explicit_keys, run_dir_of


def _eval_cfg(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("evaluate", overrides=list(overrides))


def _fake_run(d: Path, *overrides, student=True) -> Path:
    cfg = compose(["logger=none", *overrides])
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, d / ".hydra" / "config.yaml")
    if student:
        (d / "student").mkdir()
        (d / "student" / "config.json").write_text("{}")
    return d


def test_run_gives_the_runs_student_format_task_and_length(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", "trainer.max_new_tokens=33")
    cfg = evaluation_config(_eval_cfg(f"run={run}"), explicit_keys([f"run={run}"]))
    assert cfg.model.student == str(run / "student")
    assert (cfg.model.chat_template, cfg.model.plain_template, cfg.model.system_prompt) == ("none", "{prompt}", None)
    assert cfg.dataset.name == "arithmetic" and cfg.eval.max_new_tokens == 33
    assert capsys.readouterr().out.strip() == (f"[evaluate] run {run}: the student's prompt format, dataset "
                                               "'arithmetic', benchmarks and max_new_tokens=33 from its "
                                               ".hydra/config.yaml")
    # the command line wins
    args = [f"run={run}", "dataset=gsm8k", "eval.max_new_tokens=100", "model.system_prompt=hi"]
    cfg = evaluation_config(_eval_cfg(*args), explicit_keys(args))
    assert cfg.dataset.label == "gsm8k" and cfg.eval.max_new_tokens == 100 and cfg.model.system_prompt == "hi"
    assert cfg.model.chat_template == "none"


def test_a_student_path_inside_a_run_dir_finds_the_run(tmp_path):
    run = _fake_run(tmp_path / "run")
    for student in (run / "student", run / "checkpoints" / "step_4" / "student"):
        assert run_dir_of(student) == run
        args = [f"model.student={student}"]
        cfg = evaluation_config(_eval_cfg(*args), explicit_keys(args))
        assert cfg.model.student == str(student) and cfg.dataset.name == "arithmetic"
        assert cfg.model.plain_template == "{prompt}"
    assert run_dir_of(tmp_path / "elsewhere" / "student") is None


@pytest.mark.parametrize("case, message", [
    ("no_student", "run='{run}': the run has no student/ (still running, or trainer.save_student=false); give "
                   "model.student=<run dir>/checkpoints/step_<k>/student"),
    ("not_a_run", "run='{run}': not a training run directory (no .hydra/config.yaml); give the directory a "
                  "python -m trb_exp.train run wrote"),
])
def test_run_refusals_are_one_line(case, message, tmp_path):
    run = _fake_run(tmp_path / "run", student=False) if case == "no_student" else tmp_path
    with pytest.raises(ConfigError) as e:
        evaluation_config(_eval_cfg(f"run={run}"), set())
    assert str(e.value) == message.format(run=run)


@pytest.mark.slow  # a training run and two evaluations
def test_evaluating_a_trained_run_equals_spelling_its_config_out(tiny_pair, tmp_path):
    """End to end on a 1-step run of the tiny pair: run=<dir> scores exactly as the explicit command."""
    from trb_exp.evaluate import run as evaluate
    from trb_exp.trainer import run as train

    d = tmp_path / "run"
    cfg = compose(["logger=none", "trainer.max_steps=1", "trainer.eval_size=4", "trainer.eval_samples=1",
                   "trainer.prompts_per_step=2", "trainer.max_new_tokens=12", "threads=1", "device=cpu",
                   "trainer.progress=false", f"model.student={tiny_pair / 'student'}",
                   f"model.teacher={tiny_pair / 'teacher'}"])
    train(cfg, d, on_accept=lambda ckpt: OmegaConf.save(cfg, (d / ".hydra").mkdir(parents=True) or
                                                       d / ".hydra" / "config.yaml"))  # as the CLI writes it
    common = ["eval.size=4", "eval.samples=2", "threads=1", "device=cpu"]
    by_run = evaluate(_eval_cfg(f"run={d}", *common), tmp_path / "a", explicit_keys([f"run={d}", *common]))
    spelled = [f"model.student={d / 'student'}", "dataset=arithmetic", "model.chat_template=none",
               "model.system_prompt=null", "model.plain_template='{prompt}'", "eval.max_new_tokens=12", *common]
    explicit = evaluate(_eval_cfg(*spelled), tmp_path / "b", explicit_keys(spelled))
    assert by_run["results"] == explicit["results"] and by_run["benchmarks"] == ["arithmetic"]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["model"] == str(d / "student")
