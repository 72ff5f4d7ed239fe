"""Sweeps on Hydra's launcher plugins: joblib (local parallel) and submitit (local here, SLURM on a cluster)
run the real entrypoint in worker processes, each sweep point in its own run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose

ROOT = Path(__file__).resolve().parents[1]
TINY = ["logger=none", "trainer.max_steps=2", "trainer.prompts_per_step=4", "trainer.eval_size=8",
        "trainer.eval_samples=2", "trainer.eval_every=0", "trainer.save_student=false"]


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launcher_runs_each_point_in_its_own_directory(launcher, tmp_path):
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "trb_exp.train", "-m", f"hydra/launcher={launcher}", *extra,
                        "method=opd,trb", *TINY, f"hydra.sweep.dir={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert [p.parent.name.split("_")[0] for p in summaries] == ["0", "1"]
    assert sorted(json.loads(p.read_text())["method"] for p in summaries) == ["opd", "trb"]
    for p in summaries:  # each point's own metrics: steps 1..2 and its two evaluations
        rows = [json.loads(line) for line in (p.parent / "metrics.jsonl").read_text().splitlines()]
        assert sorted({row["step"] for row in rows if "train/loss" in row}) == [1, 2]


def test_slurm_preset_requeues_and_runs_one_gpu_job_per_point():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    la = cfg.hydra.launcher
    assert la._target_.endswith("SlurmLauncher")
    assert (la.gpus_per_node, la.tasks_per_node, la.nodes, la.max_num_timeout) == (1, 1, 1, 10)
    assert la.signal_delay_s == 300 and la.timeout_min == 1440
    assert compose([]).threads == 1  # one torch thread per job unless asked otherwise
