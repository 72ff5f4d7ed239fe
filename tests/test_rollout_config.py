"""decode.RolloutConfig: frozen, every value checked in one place with one line naming the field, ``auto`` teacher
statistics resolved from the method's loss, and ``backend`` the one map from a config to a decode function."""

import dataclasses

import pytest
from conftest import compose

from trb_exp.config import ConfigError
from trb_exp.decode import RolloutConfig
from trb_exp.decode.backend import backend, sample
from trb_exp.decode.eager import sample_eager
from trb_exp.decode.static import sample_static
from trb_exp.methods import Method


def test_it_is_frozen_and_replace_makes_a_new_one():
    rc = RolloutConfig(engine="static", sync_every=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rc.engine = "eager"
    assert rc.eager() == RolloutConfig(engine="eager", sync_every=4) and rc.engine == "static"
    assert RolloutConfig(engine="static", teacher_stats="topk", topk=8, solver_iters=3).student_only() == \
        RolloutConfig(engine="static")


@pytest.mark.parametrize("kw, line", [
    (dict(engine="sglang"), "rollout.engine='sglang': use auto (vllm on a GPU with vllm installed, else static where "
                            "the architecture allows it), static, eager or vllm"),
    (dict(sync_every=0), "rollout.sync_every=0: must be null (1 on CPU, 16 on GPU) or an integer >= 1"),
    (dict(compile="yes"), "rollout.compile='yes': use true or false"),
    (dict(teacher_pass="both"), "model.teacher_pass='both': use rollout or micro_batch"),
])
def test_a_bad_value_is_one_line_naming_the_field(kw, line):
    with pytest.raises(ConfigError) as e:
        RolloutConfig(**kw)
    assert str(e.value) == line


def test_from_cfg_resolves_auto_teacher_stats_from_the_loss():
    def rc(*over):
        cfg = compose(list(over))
        return RolloutConfig.from_cfg(cfg, Method.from_cfg(cfg.method, cfg.schedule))

    assert rc("method=trb", "rollout.teacher_stats=auto").teacher_stats == "topk"
    assert rc("method=trb", "rollout.teacher_stats=auto").sparse_teacher
    assert rc("method=veto", "rollout.teacher_stats=auto").teacher_stats == "full"
    assert rc("method=opd", "model.teacher_pass=micro_batch").teacher_pass == "micro_batch"
    assert not rc("method=opd", "model.teacher_pass=micro_batch").keeps_teacher(True)
    assert rc("method=opd").keeps_teacher(True) and not rc("method=opd").keeps_teacher(False)


def test_backend_is_the_one_map_from_config_to_decode_function():
    eager, static = backend(RolloutConfig()), backend(RolloutConfig(engine="static", sync_every=2, solver_iters=5))
    assert eager.func is sample_eager and eager.keywords == {"teacher_stats": "full", "topk": 16}
    assert static.func is sample_static and static.keywords["sync_every"] == 2 and static.keywords["solver_iters"] == 5
    with pytest.raises(ValueError, match="resolve_engine"):
        backend(RolloutConfig(engine="auto"))
    with pytest.raises(TypeError, match="both config= and its fields"):
        sample(None, None, None, None, None, max_new_tokens=1, eos_id=0, pad_id=0, config=RolloutConfig(),
               engine="static")
