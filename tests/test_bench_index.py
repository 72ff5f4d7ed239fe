"""bench/: every measurement script names the one doc it produces and is in the index (bench/README.md), and
docs/numbers.md is exactly what bench/report.py renders from the committed outputs."""

import ast
import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # tests the bench/ scripts

ROOT = Path(__file__).resolve().parents[1]
BENCH = sorted((ROOT / "bench").glob("*.py"))


def _numbers():
    spec = importlib.util.spec_from_file_location("numbers_doc", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", BENCH, ids=[p.name for p in BENCH])
def test_each_script_names_its_doc_and_is_indexed(script):
    doc = ast.get_docstring(ast.parse(script.read_text()))
    produced = re.findall(r"[Pp]roduces (docs/[\w.]+\.(?:md|png))", doc)
    assert len(set(produced)) == 1, f"{script.name}: its docstring should say 'Produces docs/<one doc>'"
    index = (ROOT / "bench" / "README.md").read_text()
    row = next((line for line in index.splitlines() if line.startswith(f"| `{script.name}` |")), None)
    assert row is not None, f"bench/README.md has no row for {script.name}"
    assert f"({'../' + produced[0]})" in row and (ROOT / produced[0]).exists()


def test_numbers_doc_is_what_the_committed_outputs_render():
    assert _numbers().render() == (ROOT / "docs" / "numbers.md").read_text(), "run: python bench/report.py"


def test_markdown_tables_are_read_by_header(tmp_path):
    md = tmp_path / "t.md"
    md.write_text("text\n\n| a | b |\n|---|--:|\n| 1 | **2×** [1, 3] |\n| x | y |\n\n| c |\n|---|\n| 9 |\n")
    mod = _numbers()
    assert mod.md_tables(md) == [[{"a": "1", "b": "**2×** [1, 3]"}, {"a": "x", "b": "y"}], [{"c": "9"}]]
    assert mod.bold("**2×** [1, 3]") == "2× [1, 3]" and mod.bold("0.5") == "0.5"
