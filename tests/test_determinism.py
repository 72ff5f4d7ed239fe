"""Determinism of the trained WEIGHTS for every method: the same config and seed twice gives bitwise equal
students (and equal metrics); another seed gives another student. Each run also moves the weights, so
the equality is not the trivial one of an untrained model."""

import json
from pathlib import Path

import pytest
import torch
from cached_task import use_cached_task
from conftest import compose
from safetensors.torch import load_file

from trb_exp.trainer import run

pytestmark = pytest.mark.slow  # two end-to-end runs per method

METHODS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "method").glob("*.yaml"))
FAST = ["logger=none", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.eval_size=1",
        "trainer.eval_samples=1", "trainer.prompts_per_step=2", "trainer.rollouts_per_prompt=2",
        "trainer.max_new_tokens=8", "threads=1", "optim.warmup_steps=0"]
EXTRA = {"sft_warmup": ["method.sft_steps=1", "method.sft_samples=1", "method.sft_updates=1"],
         "skd": ["method.teacher_top_k=3"]}


@pytest.fixture(autouse=True)
def _cached_task(monkeypatch):
    use_cached_task(monkeypatch)


def _weights(run_dir):
    return load_file(str(run_dir / "student" / "model.safetensors"))


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and not k.endswith("_s")
             and k != "trb/solver_share"} for r in rows]


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_weights_other_seed_other_weights(method, tiny_pair, tmp_path):
    base = [f"method={method}", *EXTRA.get(method, []), *FAST, f"model.student={tiny_pair / 'student'}",
            f"model.teacher={tiny_pair / 'teacher'}"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(compose([*base, f"seed={seed}"]), tmp_path / name)
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    w0 = load_file(str(tiny_pair / "student" / "model.safetensors"))
    assert a.keys() == b.keys() == c.keys() == w0.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"{method}: same seed, different weights"
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert any(not torch.equal(a[k], w0[k]) for k in a), f"{method}: the run did not train"
    assert any(not torch.equal(a[k], c[k]) for k in a), f"{method}: seed 1 trained the same student as seed 0"
