"""bench/bench_rollout.py --tiny: the GPU benchmark's code path on the CPU, in seconds."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a bench/ script

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_rollout.py"


def test_bench_rollout_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_rollout", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.md"
    res = mod.main(["--tiny", "--repeats", "1", "--bandwidth", "20", "--out", str(out)])
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"hf", "student", "trb"}
    for r in rows.values():
        assert r["tokens_s"] > 0 and 0 < r["roofline_frac"] and r["roofline_tokens_s"] > 0
    assert rows["trb"]["roofline_tokens_s"] < rows["student"]["roofline_tokens_s"]  # two models read per step
    assert "HF generate" in out.read_text() and out.with_suffix(".json").exists()


def test_roofline_arithmetic():
    spec = importlib.util.spec_from_file_location("bench_rollout", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class P:
        def __init__(self, n, size):
            self.n, self.size = n, size

        def numel(self):
            return self.n

        def element_size(self):
            return self.size

    class M:
        config = type("C", (), dict(num_hidden_layers=2, num_key_value_heads=1, head_dim=4))()

        def parameters(self):
            return iter([P(1000, 2)])

    # weights 2,000 B + KV 2 (K, V) * 2 layers * 1 head * 4 * 2 B = 32 B per token, batch 2 at mean length 10 + 4 / 2
    per_step = 2000 + 2 * 32 * 12
    assert abs(mod.roofline_tokens_s([M()], 2, 10, 4, 1.0) - 2 / (per_step / 1e9)) < 1e-3
