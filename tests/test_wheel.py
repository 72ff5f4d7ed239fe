"""A wheel install (not editable) finds its config from any directory: build the wheel from a copy of
the sources, install it into a fresh target directory and compose the config outside the repo."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs a wheel

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="building a wheel without network (no build isolation) needs setuptools installed")
def test_wheel_install_composes_its_config_from_any_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("conf", "trb_exp"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("trb_exp-*.whl")
    site = tmp_path / "site"
    r = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (site / "trb_exp" / "conf" / "config.yaml").is_file()
    # every package of the source tree is in the wheel (pyproject lists them by hand)
    packages = lambda top: sorted(str(p.parent.relative_to(top)) for p in (top / "trb_exp").rglob("__init__.py"))
    assert packages(site) == packages(ROOT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    code = ("import sys, trb_exp; sys.argv = ['trb_exp.train', '--cfg', 'job']; print(trb_exp.__file__, trb_exp.conf_dir()); "
            "import runpy; runpy.run_module('trb_exp.train', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    where, cfg = r.stdout.split("\n", 1)
    assert where.split() == [str(site / "trb_exp" / "__init__.py"), str(site / "trb_exp" / "conf")]
    assert "max_steps" in cfg and "warmup_steps" in cfg
