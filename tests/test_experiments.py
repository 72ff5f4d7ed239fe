import json

import pytest
from conftest import compose


@pytest.mark.parametrize("name, student, teacher, benchmarks", [
    ("paper_0.6b_4b", "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-4B", ["gsm8k", "math500", "olympiad", "amc"]),
    ("paper_1.7b_8b", "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B", ["math500", "olympiad", "amc", "aime24", "aime25"]),
])
def test_paper_presets_carry_the_papers_common_configuration(name, student, teacher, benchmarks):
    cfg = compose([f"experiment={name}", "method=trb"])
    assert (cfg.model.student, cfg.model.teacher) == (student, teacher)
    assert cfg.dataset.label == "openthoughts3"
    t, o = cfg.trainer, cfg.optim
    assert (t.prompts_per_step, t.rollouts_per_prompt, t.max_new_tokens, t.max_steps, t.eval_every) == (64, 4, 7168, 400, 20)
    assert (o.lr, list(o.betas), o.weight_decay, o.grad_clip, o.warmup_steps) == (1e-5, [0.9, 0.999], 0.01, 1.0, 15)
    assert (cfg.method.estimator, cfg.method.topk) == ("topk", 16)
    assert list(cfg.eval.benchmarks) == benchmarks  # the setting's Table 1 columns
    assert t.eval_samples is None  # each benchmark's own n: the paper's 32 / 64 / 512
    paper_n = {"gsm8k": 32, "math500": 64, "olympiad": 64, "amc": 512, "aime24": 512, "aime25": 512}
    assert {b: compose([f"dataset={b}"]).dataset.eval_samples for b in benchmarks} == {b: paper_n[b] for b in benchmarks}
    # a command-line override still wins over the preset
    assert compose([f"experiment={name}", "optim.lr=3e-6"]).optim.lr == 3e-6


@pytest.mark.parametrize("name, pair", [("mini_a", "a"), ("mini_b", "b"), ("mini_c", "c"), ("mini_d", "d"),
                                        ("mini_e", "e")])
def test_mini_presets(name, pair):
    cfg = compose([f"experiment={name}"])
    base = compose([])
    assert cfg.model.student == "embedded:student" and cfg.dataset.name == "arithmetic"
    assert cfg.model.embedded_pair == pair
    assert cfg.optim.lr == base.optim.lr and cfg.trainer.prompts_per_step == base.trainer.prompts_per_step
    assert (cfg.trainer.max_steps, cfg.trainer.eval_every, cfg.threads) == (250, 50, 1)


@pytest.mark.slow  # loads each setting's pair and trains a step (7 s)
@pytest.mark.parametrize("name, pair", [("mini_a", "a"), ("mini_b", "b"), ("mini_c", "c"), ("mini_d", "d"),
                                        ("mini_e", "e")])
def test_each_setting_trains_on_its_pairs_task(name, pair):
    """The dataset a mini preset composes is the task its pair is built for (else the run would build a new
    pair); the generalisation pairs have vLLM-supported head sizes (32 or 64) in both towers."""
    from trb_exp.config import EMBEDDED_PAIRS
    from trb_exp.data import load_task
    from trb_exp.models import embedded_dir_of
    from trb_exp.prepare import PAIRS, embedded_pair_dir, pair_spec

    assert sorted(EMBEDDED_PAIRS) == sorted(PAIRS)
    cfg = compose([f"experiment={name}"])
    assert load_task(cfg.dataset).spec == PAIRS[pair].task
    assert pair_spec(pair, load_task(cfg.dataset).spec).key() == pair_spec(pair).key()
    shipped = embedded_dir_of(pair) / "prepare.json"
    if shipped.is_file():  # a built pair is used as shipped (never rebuilt) and holds vLLM-ready towers
        assert json.loads(shipped.read_text())["key"] == pair_spec(pair).key()
        assert embedded_pair_dir(load_task(cfg.dataset).spec, pair) == shipped.parent
    if pair in "cde":
        spec = PAIRS[pair]
        assert {m.hidden // m.heads for m in (spec.teacher, spec.student)} <= {32, 64}
        assert all(m.hidden % m.heads == 0 for m in (spec.teacher, spec.student))
