"""Graders: ``grade(response, reference) -> bool`` for every task.

``math_grade`` is the paper's grader, ``math-verify`` as verl calls it: the response's final answer is
the content of its LAST ``\\boxed{...}`` (nested braces allowed), else the text after its last GSM8K
``####``, else what math-verify's extraction finds with verl's configs (``LatexExtractionConfig()``,
``ExprExtractionConfig()``): an anchored answer ("the final answer is $6$"), else, unanchored, the
last number of the text ("I think 15" is graded as 15, exactly as verl's reward does); the reference is parsed
as LaTeX/an expression and the two are compared symbolically (``\\frac12`` = ``0.5``, ``5\\text{ cm}`` = 5,
``1,000`` = 1000, ``x=3`` = 3). The embedded arithmetic task keeps its exact-match grader
(``arithmetic.grade``); ``get_grader(name)`` picks one by config name.
"""

from __future__ import annotations

from typing import Callable



def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced, else None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    while start >= 0:
        i = text.find("{", start)
        if i >= 0 and text[start:i].strip() in ("\\boxed", "\\fbox"):
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
        # unterminated or malformed: look at the previous occurrence
        start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
    return None


def gsm8k_answer(text: str) -> str | None:
    """The text after the last ``####`` (GSM8K's answer line), commas removed, else None."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip()
    return tail.splitlines()[0].replace(",", "").strip() if tail else None


def extract_reference(solution: str, how: str) -> str:
    """Pull the reference answer out of a worked solution: ``gsm8k`` (after ``####``), ``boxed`` (the
    last ``\\boxed{}``) or ``none`` (the field already is the answer)."""
    if how not in ("gsm8k", "boxed", "none"):
        raise ValueError(f"answer_extract={how!r}: choose gsm8k, boxed or none")
    if how == "none":
        return solution
    got = gsm8k_answer(solution) if how == "gsm8k" else last_boxed(solution)
    return solution if got is None else got


def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(), ExprExtractionConfig()]


def _parse(text: str):
    from math_verify import parse

    return parse(text, _configs(), parsing_timeout=5)


def _parse_reference(reference: str):
    ref = str(reference).strip()
    if not ref:
        return []
    boxed = last_boxed(ref)
    if boxed is not None:
        ref = boxed
    gold = _parse(ref if ref.startswith("$") else f"${ref}$")
    return gold or _parse(ref)


def math_grade(response: str, reference: str) -> bool:
    """True iff the response's final answer is mathematically equivalent to ``reference`` (math-verify)."""
    from math_verify import verify

    gold = _parse_reference(reference)
    if not gold:
        return False
    boxed = last_boxed(response)
    if boxed is not None:
        pred = _parse(f"\\boxed{{{boxed}}}")
    else:
        tail = gsm8k_answer(response)
        pred = _parse(f"${tail}$") if tail is not None else _parse(response)
    if not pred:
        return False
    try:
        return bool(verify(gold, pred, timeout_seconds=5))
    except Exception:  # a sympy corner case must not stop an evaluation
        return False


def ungradable(reference: str, grader: str) -> str | None:
    """None if grader ``grader`` (``exact`` or ``math``) can grade against ``reference``, else what to do:
    ``exact`` compares integers; ``math`` needs an expression math-verify parses (not NaN, not a bare word
    such as 'three', which it reads as a product of symbols)."""
    if grader == "exact":
        try:
            int(reference.strip())
            return None
        except ValueError:
            return "the exact grader compares integers: give an integer answer, or dataset.grader=math"
    word = reference.strip()
    # a bare word parses, 'three' as the product t*h*r*e*e of symbols, which no response matches
    if len(word) > 1 and word.isascii() and word.isalpha() and word.lower() not in ("nan", "inf"):
        return (f"math-verify reads a bare word as a product of one-letter symbols ({'*'.join(word)}), which no "
                "response will match: give the answer as a number or expression (e.g. 3)")
    gold = [] if word.lower() == "nan" else _parse_reference(reference)
    if gold and not isinstance(gold[0], str):  # a sympy object, not only the text math-verify gave up on
        return None
    return "math-verify cannot parse it as a number or expression: give the final answer (e.g. 42 or \\frac{1}{2})"


def get_grader(name: str) -> Callable[[str, str], bool]:
    """``math`` (math-verify) or ``exact`` (the arithmetic task's last ``A:<int>``)."""
    if name == "math":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ValueError("grader='math' needs math-verify: pip install 'math-verify>=0.7' "
                             "(or pip install -e '.[math]')") from None
        return math_grade
    if name == "exact":
        from trb_exp.data.arithmetic import grade

        return grade
    raise ValueError(f"grader={name!r}: choose math or exact")
