"""The evaluation-noise estimate pass@1_se: hand values and a simulation of the sampling it describes."""

import math
import random

import pytest

from trb_exp.evaluation import pass_at_1_se


def test_pass_at_1_se_hand_values():
    # n=4: c=2 has variance 2*2/(4*3) = 1/3, c=0 and c=4 none; sqrt((1/3)/4)/3
    assert pass_at_1_se([0, 2, 4], 4) == pytest.approx(math.sqrt(1 / 12) / 3)
    assert pass_at_1_se([0, 0, 5, 5], 5) == 0.0  # every problem always or never solved: no sampling noise
    with pytest.raises(ValueError, match="needs n >= 2 samples per problem, got n=1"):
        pass_at_1_se([1, 0], 1)


def test_pass_at_1_se_matches_the_spread_of_repeated_evaluations():
    rng = random.Random(0)
    n, p = 4, [rng.random() ** 2 for _ in range(200)]

    def one_eval():
        c = [sum(rng.random() < pi for _ in range(n)) for pi in p]
        return sum(ci / n for ci in c) / len(p), pass_at_1_se(c, n)

    runs = [one_eval() for _ in range(2000)]
    mean = sum(v for v, _ in runs) / len(runs)
    sd = math.sqrt(sum((v - mean) ** 2 for v, _ in runs) / (len(runs) - 1))
    se = sum(s for _, s in runs) / len(runs)
    true = math.sqrt(sum(pi * (1 - pi) for pi in p) / n) / len(p)
    assert sd == pytest.approx(true, rel=0.05) and se == pytest.approx(true, rel=0.03)


def test_setup_average_has_the_standard_error_of_an_average():
    from trb_exp.data import Benchmark
    from trb_exp.evaluate import markdown_table
    from trb_exp.evaluation import evaluate_benchmarks

    fake = {"a": {"pass@1": 0.5, "pass@1_se": 0.03, "pass@2": 0.6, "mean_length": 10.0},
            "b": {"pass@1": 0.1, "pass@1_se": 0.04, "pass@2": 0.2, "mean_length": 20.0}}
    benches = [Benchmark(name, ["p"], ["1"], None, 4) for name in fake]
    scorer = lambda model, tok, prompts, answers, grade, **kw: dict(fake[kw.pop("progress")[len("eval "):]])
    out = evaluate_benchmarks(None, None, benches, progress=True, evaluate_fn=scorer)
    assert out["pass@1"] == pytest.approx(0.3) and out["pass@2"] == pytest.approx(0.4)
    assert out["pass@1_se"] == pytest.approx(0.05 / 2)  # sqrt(0.03^2 + 0.04^2) / 2, not the mean 0.035
    header = markdown_table(out, ["a", "b"]).splitlines()[0]
    assert header == "| benchmark | n | problems | pass@1 | pass@1_se | pass@2 | mean_length |"
