"""The embedded task: multi-step integer arithmetic with a chain-of-thought solution.

A problem is an expression such as ``3+4*2-7=``; its solution does the multiplications first
(left to right), then additions and subtractions (left to right), one step per ``;``-separated
line, and ends with an answer line::

    3+4*2-7=   ->   4*2=8;3+8=11;11-7=4;A:4

The generator is seeded and pure: the same ``ArithmeticSpec`` gives the same train and test
splits on every machine. Train and test are disjoint by expression. The grader reads the last
``A:<int>`` in a response and compares it with the reference answer exactly.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, asdict

from datasets import Dataset

OPS = "+-*"
ANSWER_RE = re.compile(r"A:(-?\d+)")


@dataclass(frozen=True)
class ArithmeticSpec:
    """Difficulty knobs and split sizes of the synthetic task."""

    min_operands: int = 2
    max_operands: int = 4
    max_operand: int = 9  # operands are drawn from [0, max_operand]
    ops: str = OPS
    train_size: int = 20000
    test_size: int = 200
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(
                f"dataset.min_operands={self.min_operands}, max_operands={self.max_operands}: "
                "need 2 <= min_operands <= max_operands"
            )
        if self.max_operand < 1:
            raise ValueError(f"dataset.max_operand={self.max_operand}: must be >= 1")
        if not self.ops or set(self.ops) - set(OPS):
            raise ValueError(f"dataset.ops={self.ops!r}: use a non-empty subset of {OPS!r}")
        if self.train_size < 1 or self.test_size < 1:
            raise ValueError("dataset.train_size and dataset.test_size must be >= 1")


def solve(operands: list[int], ops: list[str]) -> tuple[list[str], int]:
    """Solution steps and answer: ``*`` first left to right, then ``+``/``-`` left to right."""
    vals, pending, steps = list(operands), list(ops), []
    i = 0
    while i < len(pending):  # multiplications
        if pending[i] == "*":
            a, b = vals[i], vals[i + 1]
            steps.append(f"{a}*{b}={a * b}")
            vals[i : i + 2] = [a * b]
            pending.pop(i)
        else:
            i += 1
    acc = vals[0]
    for op, b in zip(pending, vals[1:]):  # additions / subtractions
        new = acc + b if op == "+" else acc - b
        steps.append(f"{acc}{op}{b}={new}")
        acc = new
    return steps, acc


def format_solution(steps: list[str], answer: int) -> str:
    return "".join(s + ";" for s in steps) + f"A:{answer}"


def sample_problem(rng: random.Random, spec: ArithmeticSpec) -> dict:
    n = rng.randint(spec.min_operands, spec.max_operands)
    operands = [rng.randint(0, spec.max_operand) for _ in range(n)]
    ops = [rng.choice(spec.ops) for _ in range(n - 1)]
    prompt = "".join(f"{x}{o}" for x, o in zip(operands, ops)) + f"{operands[-1]}="
    steps, answer = solve(operands, ops)
    return {"prompt": prompt, "solution": format_solution(steps, answer), "answer": str(answer)}


def make_splits(spec: ArithmeticSpec) -> dict[str, Dataset]:
    """Deterministic, expression-disjoint train/test splits as ``datasets.Dataset``s.

    The test split is drawn first, so growing ``train_size`` never changes the test set.
    If the expression space is smaller than requested, the splits are as large as it allows.
    """
    rng = random.Random(spec.seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"test": [], "train": []}
    for name, size in (("test", spec.test_size), ("train", spec.train_size)):
        misses = 0
        while len(splits[name]) < size and misses < 50 * size:
            row = sample_problem(rng, spec)
            if row["prompt"] in seen:
                misses += 1
                continue
            seen.add(row["prompt"])
            splits[name].append(row)
    if not splits["test"] or not splits["train"]:
        raise ValueError(f"dataset: the spec {asdict(spec)} yields an empty split")
    return {k: Dataset.from_list(v) for k, v in splits.items()}


def make_validation(spec: ArithmeticSpec, size: int, taken: set[str]) -> Dataset:
    """``size`` problems of the task, none of whose prompts is in ``taken`` (the train and test prompts),
    drawn from their own seeded stream: the train and test splits are the same with or without them.
    If the expression space left is smaller, the split is as large as it allows (possibly empty)."""
    rng = random.Random(f"validation-{spec.seed}")
    seen, rows, misses = set(taken), [], 0
    while len(rows) < size and misses < 50 * size:
        row = sample_problem(rng, spec)
        if row["prompt"] in seen:
            misses += 1
            continue
        seen.add(row["prompt"])
        rows.append(row)
    return Dataset.from_list(rows) if rows else Dataset.from_dict({"prompt": [], "solution": [], "answer": []})


def extract_answer(response: str) -> str | None:
    """The last ``A:<int>`` in a response, or None."""
    found = ANSWER_RE.findall(response)
    return found[-1] if found else None


def grade(response: str, reference: str) -> bool:
    """Exact match of the extracted final answer with the reference integer."""
    got = extract_answer(response)
    return got is not None and int(got) == int(reference)
