"""A per-session cache of ``load_task`` for tests that run the trainer many times: building the embedded
task (20,000 seeded training problems) takes about 1 s per run, more than a tiny run itself. The task is a
pure function of its config, so every run still gets exactly the data it would build."""

from omegaconf import OmegaConf

import trb_exp.experiment as experiment_mod

_real_load_task = experiment_mod.load_task
_CACHE = {}


def cached_load_task(cfg):
    key = OmegaConf.to_yaml(cfg, resolve=True)
    if key not in _CACHE:
        _CACHE[key] = _real_load_task(cfg)
    return _CACHE[key]


def use_cached_task(monkeypatch):
    monkeypatch.setattr(experiment_mod, "load_task", cached_load_task)  # setup() builds the task
