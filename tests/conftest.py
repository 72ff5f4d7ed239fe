import os
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A random tiny student/teacher pair on the char tokenizer, saved like any HF model."""
    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.models import tiny_llama

    root = tmp_path_factory.mktemp("pair")
    tok = build_char_tokenizer()
    for role, (hidden, layers) in {"teacher": (32, 2), "student": (16, 1)}.items():
        m = tiny_llama(tok, hidden=hidden, layers=layers, heads=2, intermediate=2 * hidden, seed=len(role))
        m.save_pretrained(root / role)
        tok.save_pretrained(root / role)
    return root


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a model is loaded: a bad input must be reported before anything heavy."""
    from trb_exp import experiment

    def fail(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(experiment, "load_model", fail)


def wait_until(proc, cond, timeout: float = 240.0) -> None:
    """Poll ``cond()`` until it holds, failing if the subprocess ``proc`` ends first or ``timeout`` seconds pass
    (the signal tests: send the signal at the moment the condition describes)."""
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()}"
        assert time.time() - t0 < timeout, "timed out waiting for the run"
        time.sleep(0.001)
