"""bench/mutation_check.py stays runnable: every planted bug's source edit still matches the code exactly once
(two of them pointed at trainer.py lines that the decode/ split had moved, and the script stopped at them)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutant_edit_matches_the_source_exactly_once():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "bench" / "mutation_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = mod  # dataclasses resolve the module by name
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop("mutation_check", None)
    assert len(mod.MUTANTS) == 16
    counts = {(m.name, old): (ROOT / m.path).read_text().count(old) for m in mod.MUTANTS for old, _ in m.edits}
    assert {k: n for k, n in counts.items() if n != 1} == {}
