"""trb_exp.run.environment: the record every run's summary.json carries, against torch/git themselves."""

import subprocess

import torch
import transformers

from trb_exp.run.environment import PACKAGE_DIR, bit_exact_mismatch, current_environment, git_state


def _git(where, *args):
    return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_record_matches_torch_and_the_checkout():
    env = current_environment()
    assert env.torch == torch.__version__ and env.transformers == transformers.__version__
    assert env.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert env.threads == torch.get_num_threads()
    assert env.gpu == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    try:
        head = _git(PACKAGE_DIR, "rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):  # a wheel or a tarball: no commit, and no dirty flag
        assert env.commit is None and env.dirty is None
    else:
        assert env.commit == head and isinstance(env.dirty, bool)
    assert set(env.as_dict()) == {"torch", "transformers", "cpu_capability", "threads", "gpu", "commit", "dirty"}


def test_git_state_clean_dirty_and_outside_a_checkout(tmp_path):
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_state(outside) == (None, None)  # no exception outside a checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "f.txt").write_text("one\n")
    _git(repo, "add", "f.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "untracked.txt").write_text("x\n")  # untracked files (e.g. a pair being built) are not "dirty"
    assert git_state(repo) == (head, False)
    (repo / "f.txt").write_text("two\n")
    assert git_state(repo) == (head, True)


def test_bit_exact_mismatch_names_the_fields():
    a = {"torch": "2.13.0", "transformers": "5.25.0", "cpu_capability": "AVX512", "threads": 1}
    assert bit_exact_mismatch([a, {**a, "threads": 2}, None]) is None
    assert bit_exact_mismatch([a, {**a, "torch": "2.12.0", "cpu_capability": "AVX2"}]) == (
        "warning: the runs were made in different environments (cpu_capability AVX2 vs AVX512; torch 2.12.0 vs "
        "2.13.0): their values agree bit for bit only within one ISA and library versions")
