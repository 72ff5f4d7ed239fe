"""Review findings of issue 10: trainer.eval_samples=null evaluates each benchmark at its own n."""

import json

import pytest
from conftest import compose

from trb_exp.trainer import run


@pytest.mark.slow
def test_eval_samples_null_uses_each_benchmarks_own_n(tiny_pair, tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": "4"}\n')
    benchmarks = (f"eval.benchmarks=[{{config:local,train_file:'{data}',test_file:'{data}',eval_samples:3}},"
                  "{config:arithmetic,eval_samples:2}]")
    cfg = compose(["logger=none", "trainer.max_steps=1", "trainer.eval_size=2", "trainer.eval_samples=null",
                   "trainer.prompts_per_step=2", "trainer.max_new_tokens=4", "threads=1", "trainer.progress=false",
                   f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}", benchmarks])
    run(cfg, tmp_path / "run")
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 1]
    for r in evals:  # not n = 4 for both (the Benchmark was rebuilt without its n_samples)
        assert r["eval/local/n_samples"] == 3 and r["eval/arithmetic/n_samples"] == 2
        assert "eval/local/pass@2" in r and "eval/local/pass@4" not in r
