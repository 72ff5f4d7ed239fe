"""Sweeps on Hydra's launcher plugins: joblib (local parallel) and submitit (local here, SLURM on a cluster)
run the real entrypoint in worker processes, each sweep point in its own run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose

pytestmark = pytest.mark.slow  # Hydra launcher multiruns in subprocesses

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


def _submitit_tasks(marker: str) -> list[int]:
    """The pids of the submitit task processes (``submitit.core._submit``) of the sweep tagged ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes()
        except (OSError, ValueError):
            continue
        if b"submitit.core._submit" in cmd and f"TRB_TEST_MARKER={marker}".encode() in env:
            pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the job's tasks through /proc")
def test_submitit_job_of_two_tasks_trains_distributed_and_requeues_after_its_checkpoint(tmp_path):
    """`hydra/launcher=submitit_local hydra.launcher.tasks_per_node=2`: one job, two processes that form one
    gloo process group from submitit's environment (as torchrun's); submitit's preemption signal (SIGUSR2) sent
    to both tasks mid-run makes the trainer checkpoint, then submitit requeues the job (its own handler, called
    after the checkpoint), and the requeued job resumes in the same run directory and finishes."""
    import signal
    import time
    import uuid

    marker = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "TRB_TEST_MARKER": marker}
    steps = 16
    proc = subprocess.Popen([sys.executable, "-m", "trb_exp.train", "-m", "hydra/launcher=submitit_local",
                             "hydra.launcher.tasks_per_node=2", "method=opd", *TINY, f"trainer.max_steps={steps}",
                             "trainer.max_new_tokens=8", "trainer.checkpoint_every=0", "trainer.progress=false",
                             f"hydra.sweep.dir={tmp_path}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while True:  # the first training step is logged: both tasks are in the loop
            metrics = list(tmp_path.glob("0_*/metrics.jsonl"))
            if metrics and '"train/loss"' in metrics[0].read_text():
                break
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() - t0 < 150, "timed out waiting for the first step"
            time.sleep(0.05)
        tasks = _submitit_tasks(marker)
        assert len(tasks) == 2, tasks
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        out, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    run = metrics[0].parent
    logs = {p.name: p.read_text() for p in tmp_path.glob(".submitit/*/*_log.*")}
    rank0 = "".join(v for k, v in sorted(logs.items()) if "_0_log" in k)
    rank1 = "".join(v for k, v in sorted(logs.items()) if "_1_log" in k)
    assert "[distributed] rank 0 of 2 (gloo)" in rank0 and "[distributed] rank 1 of 2 (gloo)" in rank1
    ckpts = sorted(run.glob("checkpoints/step_*"))
    assert len(ckpts) == 1 and 1 <= int(ckpts[0].name[5:]) < steps, ckpts  # the signal's checkpoint (checkpoint_every=0)
    k = int(ckpts[0].name[5:])
    # the trainer checkpointed first, then handed over to submitit, which requeued the job
    assert rank0.index(f"[SIGUSR2] checkpoint {ckpts[0]}") < rank0.index("Requeued job")
    assert f"[resume] {ckpts[0]}" in rank0  # the requeued job, same run directory
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == list(range(1, steps + 1))
    assert json.loads((run / "summary.json").read_text())["steps"] == steps and k < steps


def test_slurm_8gpu_preset_runs_one_8_process_job_per_point():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm_8gpu"], return_hydra_config=True)
    la = cfg.hydra.launcher
    assert la._target_.endswith("SlurmLauncher")
    assert (la.gpus_per_node, la.tasks_per_node, la.nodes, la.max_num_timeout, la.signal_delay_s) == (8, 8, 1, 10, 300)
