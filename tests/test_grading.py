"""The math-verify grader (the paper's): final-answer extraction and equivalence, on a table of
(response, reference, expected) cases; the arithmetic task's exact-match grader behind the same interface."""

import pytest

from trb_exp.data.grading import extract_reference, get_grader, gsm8k_answer, last_boxed, math_grade

CASES = [
    # equivalent forms
    (r"So the answer is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", True),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    (r"\boxed{\frac{2}{4}}", "0.5", True),
    (r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2", True),
    (r"\boxed{142}", "142.0", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{x = 3}", "3", True),
    (r"\boxed{(1, 2)}", "(1,2)", True),
    (r"\boxed{\{1, 2\}}", "1,2", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{-7}", "-7", True),
    # units and currency
    (r"The length is \boxed{5 \text{ cm}}.", "5", True),
    (r"\boxed{\$18}", "18", True),
    (r"\boxed{90^\circ}", "90", True),
    # trailing text after the box, several boxes (the last one counts)
    (r"We get \boxed{12}. Double-checking: yes, 12 is right.", "12", True),
    (r"First guess \boxed{10}, but correcting: \boxed{12}", "12", True),
    (r"First guess \boxed{12}, but correcting: \boxed{10}", "12", False),
    # nested braces inside the box
    (r"\boxed{\frac{3}{\sqrt{4}}}", r"\frac{3}{2}", True),
    (r"\boxed{\left(\frac{1}{2}, \frac{3}{4}\right)}", r"\left(\frac12,\frac34\right)", True),
    # GSM8K's '####' answer line (response and reference)
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", True),
    ("She has 1,200 dollars left.\n#### 1,200", "1200", True),
    ("#### 71", "72", False),
    (r"\boxed{72}", "Natalia sold 48 + 24 = 72 clips.\n#### 72", True),
    # a reference given as a worked solution with a box
    (r"\boxed{4}", r"Adding, $2+2=\boxed{4}$.", True),
    # wrong answers
    (r"\boxed{17}", "18", False),
    (r"\boxed{\frac{1}{3}}", "0.5", False),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{8}", False),
    (r"\boxed{(1, 3)}", "(1,2)", False),
    # no extractable answer / empty
    ("I am not sure.", "5", False),
    ("", "5", False),
    (r"\boxed{}", "5", False),
    (r"\boxed{5", "5", False),  # unterminated box: no final answer
    # no box, no '####': math-verify's own extraction, as verl calls it (ExprExtractionConfig() and
    # LatexExtractionConfig()): an anchored answer, else the last number of the text, unanchored
    ("The final answer is $6$.", "6", True),
    ("I think 15", "15", True),  # unanchored trailing number: accepted, as in verl's math_verify reward
    ("15 apples, or maybe 16", "15", False),  # the LAST number counts
]


@pytest.mark.parametrize("response, reference, expected", CASES)
def test_math_grade_table(response, reference, expected):
    assert math_grade(response, reference) is expected


def test_table_is_large_enough():
    assert len(CASES) >= 30


def test_extraction_helpers():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{\sqrt{2}}} c") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no box") is None and last_boxed(r"\boxed{open") is None
    assert gsm8k_answer("work\n#### 1,234\n") == "1234" and gsm8k_answer("no answer") is None
    assert extract_reference("steps\n#### 18", "gsm8k") == "18"
    assert extract_reference(r"so $\boxed{\frac{3}{4}}$.", "boxed") == r"\frac{3}{4}"
    assert extract_reference("42", "none") == "42"
    with pytest.raises(ValueError, match="answer_extract"):
        extract_reference("x", "regex")


def test_graders_share_one_interface():
    exact, math = get_grader("exact"), get_grader("math")
    assert exact("4*2=8;3+8=11;A:11", "11") and not exact("A:12", "11")
    assert math(r"\boxed{11}", "11") and not math(r"\boxed{12}", "11")
    with pytest.raises(ValueError, match="grader='regex'"):
        get_grader("regex")
