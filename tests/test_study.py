"""The miniature study's plumbing: sweep presets (the paper's grids), the second embedded pair,
scripts/select_best.py and scripts/collect_runs.py, scripts/reproduce_mini.sh."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import CONF_DIR, compose

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sweep_params(name):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"sweep={name}"], return_hydra_config=True)
    return cfg, dict(cfg.hydra.sweeper.params or {})


# family preset -> (method, its paper grid, number of runs per seed)
PAPER = {
    "trb": ("trb", {"schedule.eps0": "0.001,0.005,0.01,0.02,0.05", "schedule.warmup_steps": "15,25,50"}, 15),
    "fixed_blend": ("fixed_blend", {"schedule.eps0": "0.001,0.005,0.01,0.02,0.05"}, 5),
    "skd": ("skd", {"method.teacher_top_k": "15,25,50", "method.teacher_temperature": "0.2,0.6,1.0"}, 9),
    "veto": ("veto", {"method.b_start": "0.2,0.4,0.6,0.8"}, 4),
    "temp_warmup": ("temp_warmup", {"method.t0": "0.8,0.9,0.95", "method.K": "15,25"}, 6),
    "sft_warmup": ("sft_warmup", {"method.sft_updates": "15,25,50"}, 3),
    "opd": ("opd", {}, 1),
    "offline_kd": ("offline_kd", {}, 1),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_sweep_presets(name):
    method, grid, runs = PAPER[name]
    cfg, params = _sweep_params(name)
    assert cfg.method.name == method
    params.pop("schedule", None)  # trb pins the linear schedule
    assert {k: str(v).replace(" ", "") for k, v in params.items()} == grid
    assert math.prod(len(v.split(",")) for v in grid.values()) == runs


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.stem for p in sorted((ROOT / "conf" / "sweep").glob("*.yaml"))])
def test_every_swept_key_exists(name):
    """A typo in a swept key (method.teacher_topk) would make Hydra fail only at launch: catch it here."""
    from trb_exp.config import validate
    from trb_exp.methods import Method

    cfg, params = _sweep_params(name)
    for key, values in params.items():
        if key == "schedule":
            for v in str(values).split(","):
                assert (ROOT / "conf" / "schedule" / f"{v}.yaml").is_file()
                Method.from_cfg(*(lambda c: (c.method, c.schedule))(compose([f"sweep={name}", f"schedule={v}"])))
            continue
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", f"sweep={name}: {key} is not a config key"
        for v in str(values).split(","):  # every grid value composes and passes validation
            c = compose([f"sweep={name}", f"{key}={v}"])
            validate(c)
            Method.from_cfg(c.method, c.schedule)


def test_adaptive_sweep_runs_both_adaptive_budgets_without_a_K_grid():
    cfg, params = _sweep_params("trb_adaptive")
    assert cfg.method.name == "trb" and params == {"schedule": "gap,reward"}


def test_mini_grids_differ_from_the_papers_only_where_stated():
    for name, key in (("trb_mini", "schedule.eps0"), ("fixed_blend_mini", "schedule.eps0"),
                      ("skd_mini", "method.teacher_top_k")):
        _, params = _sweep_params(name)
        assert len(str(params[key]).split(",")) == len(PAPER[name[:-5]][1][key].split(","))
        assert str(params[key]).replace(" ", "") != PAPER[name[:-5]][1][key]
    # the SKD mini grid must inject at all on the 21-token vocabulary (K >= vocab never replaces)
    _, params = _sweep_params("skd_mini")
    assert max(int(k) for k in str(params["method.teacher_top_k"]).split(",")) < 21


@pytest.mark.slow
def test_multirun_with_a_sweep_preset_adds_the_seed_list(tmp_path):
    """`-m sweep=veto seed=3,4` launches the preset's 4 configurations x the 2 command-line seeds."""
    out = subprocess.run(
        [sys.executable, "-m", "trb_exp.train", "-m", "sweep=veto", "seed=3,4", "logger=none", "trainer.max_steps=1",
         "trainer.eval_every=0", "trainer.eval_size=1", "trainer.eval_samples=1", "trainer.prompts_per_step=1",
         "trainer.max_new_tokens=4", "trainer.save_student=false", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted(p.parent.name.split("_", 1)[1] for p in tmp_path.glob("*/summary.json"))
    assert len(runs) == 8
    for b in ("0.2", "0.4", "0.6", "0.8"):
        for seed in (3, 4):
            assert sum(f"method.b_start={b}," in r and f"seed={seed}," in r for r in runs) == 1
    for p in tmp_path.glob("*/.hydra/config.yaml"):
        cfg = OmegaConf.load(p)
        assert cfg.method.name == "veto" and cfg.seed in (3, 4)


# ------------------------------------------------------------------------------------ pair b


def test_second_pair_is_a_different_named_pair():
    from trb_exp.config import ConfigError, validate
    from trb_exp.models import EMBEDDED, embedded_dir_of
    from trb_exp.prepare import pair_spec

    a, b = pair_spec("a"), pair_spec("b")
    assert a.key() != b.key() and b.teacher.hidden > a.teacher.hidden and b.student.hidden > a.student.hidden
    assert embedded_dir_of("a") == EMBEDDED and embedded_dir_of("b").name == "embedded_b"
    shipped = json.loads((embedded_dir_of("b") / "prepare.json").read_text())
    assert shipped["key"] == b.key()  # the shipped files are the ones pair b's spec trains
    assert shipped["teacher"]["params"] > json.loads((EMBEDDED / "prepare.json").read_text())["teacher"]["params"]
    cfg = compose(["model=embedded_b"])
    assert cfg.model.embedded_pair == "b"
    with open_dict(cfg):
        cfg.model.embedded_pair = "z"
    with pytest.raises(ConfigError, match=r"model.embedded_pair='z'"):
        validate(cfg)
    with pytest.raises(ConfigError, match="unknown pair"):
        pair_spec("z")


def test_pair_b_loads_and_decodes():
    """The shipped pair b is a working student/teacher pair on the task's tokenizer."""
    import torch

    from trb_exp.data import encode_prompts
    from trb_exp.models import load_model, load_tokenizer, resolve
    from trb_exp.prepare import embedded_pair_dir
    from trb_exp.prepare import pair_spec

    d = embedded_pair_dir(pair_spec("b").task, "b")
    tok = load_tokenizer("embedded:student", False, d, field="model.student")
    ids, mask = encode_prompts(tok, ["3+4*2=?"])
    for role in ("student", "teacher"):
        assert resolve(f"embedded:{role}", d).endswith(f"embedded_b/{role}")
        m = load_model(f"embedded:{role}", device=torch.device("cpu"), dtype="float32", trust_remote_code=False,
                       train=False, embedded_dir=d, field=f"model.{role}")
        logits = m(input_ids=ids, attention_mask=mask).logits
        assert logits.shape[-1] >= len(tok) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------- study scripts


def _run(d, method, seed, finals, overrides, val=None):
    d.mkdir(parents=True)
    (d / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create({"seed": seed, "method": {"name": method, **overrides.get("knobs", {})},
                                     "schedule": {"name": "linear", "eps0": 0.5, "warmup_steps": 10}}),
                   d / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides["cli"]), d / ".hydra" / "overrides.yaml")
    rows = [{"step": s, "eval/pass@1": v} for s, v in zip((0, 10, 20), finals)]
    for row, v in zip(rows, val or []):
        row["val/pass@1"] = v
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"method": method, "seed": seed}))
    (d / "student").mkdir()
    (d / "student" / "model.safetensors").write_bytes(b"x" * 10)


@pytest.mark.slow
def test_select_best_and_collect(tmp_path):
    sweep = tmp_path / "sweep"
    # veto: b_start 0.2 ends at 0.3, b_start 0.6 ends at 0.5 (but 0.2 has the best checkpoint, 0.9 at step 10)
    _run(sweep / "veto" / "0", "veto", 0, [0.0, 0.9, 0.3],
         {"knobs": {"b_start": 0.2}, "cli": ["method.b_start=0.2", "experiment=mini_a", "sweep=veto", "seed=0",
                                             "logger=none", "hydra.sweep.dir=x"]})
    _run(sweep / "veto" / "1", "veto", 0, [0.0, 0.1, 0.5],
         {"knobs": {"b_start": 0.6}, "cli": ["method.b_start=0.6", "experiment=mini_a", "sweep=veto", "seed=0",
                                             "logger=none"]})
    _run(sweep / "veto" / "2", "veto", 1, [0.0, 0.1, 0.99],  # another seed: not the selection seed
         {"knobs": {"b_start": 0.2}, "cli": ["method.b_start=0.2", "seed=1"]})
    _run(sweep / "opd" / "0", "opd", 0, [0.0, 0.2, 0.4], {"cli": ["experiment=mini_a", "sweep=opd", "seed=0"]})
    best = _script("select_best").select(sweep, seeds=(0,), on="test")
    assert best["veto"].score == 0.5 and best["veto"].overrides == ["method=veto", "method.b_start=0.6"]
    assert best["opd"].overrides == ["method=opd"]
    assert _script("select_best").select(sweep, (1,), on="test")["veto"].overrides == ["method=veto", "method.b_start=0.2"]
    with pytest.raises(SystemExit, match="no val/pass@1 logged"):  # the default: validation, which these lack
        _script("select_best").select(sweep)

    collect = _script("collect_runs").collect
    assert collect(sweep, tmp_path / "docs") == 4
    kept = sorted(str(p.relative_to(tmp_path / "docs")) for p in (tmp_path / "docs").rglob("*") if p.is_file())
    assert kept == sorted(f"{r}/{f}" for r in ("opd/0", "veto/0", "veto/1", "veto/2")
                          for f in ("metrics.jsonl", "summary.json", ".hydra/config.yaml", ".hydra/overrides.yaml"))
    with pytest.raises(SystemExit, match="no finished run"):
        collect(tmp_path / "nothing", tmp_path / "x")


def test_select_best_and_collect_read_and_write_data_files(tmp_path):
    from trb_exp.analysis import runstore

    sweep = tmp_path / "sweep"
    for i, (b_start, final) in enumerate(((0.2, 0.3), (0.6, 0.5))):
        _run(sweep / "veto" / str(i), "veto", 0, [0.0, 0.1, final],
             {"knobs": {"b_start": b_start}, "cli": [f"method.b_start={b_start}", "sweep=veto", "seed=0"]})
    _run(sweep / "opd" / "0", "opd", 0, [0.0, 0.2, 0.4], {"cli": ["sweep=opd", "seed=0"]})
    (sweep / "opd" / "1" / ".hydra").mkdir(parents=True)  # an unfinished run: never collected
    (sweep / "opd" / "1" / ".hydra" / "config.yaml").write_text("seed: 1\nmethod:\n  name: opd\n")
    (sweep / "opd" / "1" / "metrics.jsonl").write_text('{"step": 0, "eval/pass@1": 0.9}\n')
    collect, data = _script("collect_runs").collect, tmp_path / "study" / "runs.jsonl.gz"
    assert collect(sweep, data) == 3
    assert [r.name for r in runstore.load(data)] == ["opd/0", "veto/0", "veto/1"]
    select = _script("select_best").select
    assert select(data, on="test") == select(sweep, on="test")  # these runs have no validation split
    assert select(data, on="test")["veto"] == ("method.b_start=0.6", 0.5, 0.5, ["method=veto", "method.b_start=0.6"])
    more = tmp_path / "more"  # a second collection adds its runs and replaces a run of the same name
    _run(more / "opd" / "0", "opd", 0, [0.0, 0.2, 0.7], {"cli": ["sweep=opd", "seed=0"]})
    _run(more / "skd" / "0", "skd", 0, [0.0, 0.2, 0.1], {"cli": ["sweep=skd", "seed=0"]})
    assert collect(more, data) == 2
    recs = {r.name: r for r in runstore.load(data)}
    assert sorted(recs) == ["opd/0", "skd/0", "veto/0", "veto/1"] and recs["opd/0"].rows[-1]["eval/pass@1"] == 0.7
    assert collect(data, tmp_path / "dirs") == 4  # and back to run directories
    assert (tmp_path / "dirs" / "veto" / "1" / ".hydra" / "overrides.yaml").read_bytes() == \
        (sweep / "veto" / "1" / ".hydra" / "overrides.yaml").read_bytes()


def test_the_mini_readme_table_is_study_summary_of_the_data_files(capsys):
    """docs/results/mini/README.md's results table is what scripts/study_summary.py prints from the committed
    data files (mini_a/runs.jsonl.gz, mini_b/runs.jsonl.gz)."""
    mod = _script("study_summary")
    study = ROOT / "docs" / "results" / "mini"
    assert mod.setting_runs(study, "mini_a") == study / "mini_a" / "runs.jsonl.gz"
    mod.main(study)
    table = capsys.readouterr().out
    assert table.count("\n") == 9 and table in (study / "README.md").read_text()


@pytest.mark.slow
def test_reproduce_script_is_valid_bash_and_names_every_family():
    script = (ROOT / "scripts" / "reproduce_mini.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "reproduce_mini.sh")]).returncode == 0
    for preset in ("trb_mini", "skd_mini", "fixed_blend_mini", "temp_warmup", "veto", "sft_warmup", "opd", "offline_kd"):
        assert preset in script and (ROOT / "conf" / "sweep" / f"{preset}.yaml").is_file()


@pytest.mark.slow
def test_paper_reproduction_script_names_every_paper_grid():
    script = ROOT / "scripts" / "reproduce_paper.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for fam in ("trb", "fixed_blend", "skd", "veto", "temp_warmup", "sft_warmup", "opd"):
        assert f" {fam}" in text.split("for fam in", 1)[1].split(";", 1)[0]
    bad = subprocess.run(["bash", str(script), "paper_9b"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no experiment preset conf/experiment/paper_9b.yaml" in bad.stderr


def test_select_best_on_validation_reports_the_test_score(tmp_path, capsys):
    sel = _script("select_best")
    sweep = tmp_path / "sweep"
    # b_start 0.2 is best on test (0.9) but worst on validation; 0.6 wins on validation over seeds 0 and 1
    for i, (b, seed, test, val) in enumerate([(0.2, 0, [0.0, 0.5, 0.9], [0.0, 0.1, 0.2]),
                                              (0.2, 1, [0.0, 0.5, 0.7], [0.0, 0.1, 0.4]),
                                              (0.6, 0, [0.0, 0.2, 0.4], [0.0, 0.3, 0.5]),
                                              (0.6, 1, [0.0, 0.2, 0.2], [0.0, 0.1, 0.3]),
                                              (0.6, 2, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])]):  # not a selection seed
        _run(sweep / str(i), "veto", seed, test, {"knobs": {"b_start": b}, "cli": [f"method.b_start={b}", f"seed={seed}"]},
             val=val)
    best = sel.select(sweep, seeds=(0, 1))["veto"]
    assert best.overrides == ["method=veto", "method.b_start=0.6"]
    assert best.score == pytest.approx(0.4) and best.test == pytest.approx(0.3)  # means over seeds 0, 1
    auc = sel.select(sweep, seeds=(0,), score="auc")["veto"]  # trapezoid: (0+0.3)/2 + (0.3+0.5)/2 over 2 spans
    assert auc.score == pytest.approx(((0.0 + 0.3) / 2 * 10 + (0.3 + 0.5) / 2 * 10) / 20)
    assert auc.test == pytest.approx(((0.0 + 0.2) / 2 * 10 + (0.2 + 0.4) / 2 * 10) / 20)
    assert sel.select(sweep, seeds=(0, 1), on="test")["veto"].overrides == ["method=veto", "method.b_start=0.2"]
    sel.main([str(sweep), "--seeds", "0,1"])
    out, err = capsys.readouterr()
    assert out == "veto method=veto method.b_start=0.6\n"
    assert "test final pass@1 0.3000" in err and "val final pass@1 0.4000 (seeds 0,1)" in err
