import pytest
from conftest import compose


@pytest.mark.parametrize("name, student, teacher", [
    ("paper_0.6b_4b", "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-4B"),
    ("paper_1.7b_8b", "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B"),
])
def test_paper_presets_carry_the_papers_common_configuration(name, student, teacher):
    cfg = compose([f"experiment={name}", "method=trb"])
    assert (cfg.model.student, cfg.model.teacher) == (student, teacher)
    assert cfg.dataset.label == "openthoughts3"
    t, o = cfg.trainer, cfg.optim
    assert (t.prompts_per_step, t.rollouts_per_prompt, t.max_new_tokens, t.max_steps, t.eval_every) == (64, 4, 7168, 400, 20)
    assert (o.lr, list(o.betas), o.weight_decay, o.grad_clip, o.warmup_steps) == (1e-5, [0.9, 0.999], 0.01, 1.0, 15)
    assert (cfg.method.estimator, cfg.method.topk) == ("topk", 16)
    assert list(cfg.eval.benchmarks) == ["gsm8k", "math500", "olympiad", "amc", "aime24", "aime25"]
    # a command-line override still wins over the preset
    assert compose([f"experiment={name}", "optim.lr=3e-6"]).optim.lr == 3e-6


def test_mini_a_is_the_embedded_default():
    cfg = compose(["experiment=mini_a"])
    base = compose([])
    assert cfg.model.student == "embedded:student" and cfg.dataset.name == "arithmetic"
    assert cfg.trainer.max_steps == base.trainer.max_steps and cfg.optim.lr == base.optim.lr
    assert cfg.trainer.eval_every == 50
