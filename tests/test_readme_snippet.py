"""The example under "## Use TRB in your own trainer" in README.md runs as written."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Use TRB in your own trainer"


def snippet() -> str:
    text = README.read_text()
    assert HEADING in text, f"README.md has no section {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert m, f"no ```python block under {HEADING!r}"
    return m.group(1)


def test_readme_trainer_snippet_runs():
    code = snippet()
    assert "trust_region_blend" in code and len(code.strip().splitlines()) <= 12
    out = io.StringIO()
    scope: dict = {"__name__": "readme_snippet"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), scope)
    printed = out.getvalue()
    assert "beta:" in printed and "kl:" in printed
    res, eps = scope["res"], 0.05
    assert (res.kl <= eps + 1e-6).all() and ((res.beta > 0) & (res.beta < 1)).all()
    assert scope["tokens"].shape == (4, 1)
