"""Tasks, encoders and graders. The embedded task lives in ``arithmetic``."""

from __future__ import annotations

import torch


def encode_prompts(tokenizer, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask [B, P] (the tokenizer adds BOS if it has one)."""
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt", padding_side="left")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def encode_targets(tokenizer, targets: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded response ids [B, T] ending with EOS, and the mask of real tokens."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in targets]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------- tasks
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

from trb_exp.config import ConfigError  # noqa: E402


@dataclass
class Task:
    """What the trainer needs from a dataset: training prompts (with answers, for the reward of
    training rollouts), held-out prompts with reference answers, and a grader."""

    train_prompts: list[str]
    train_answers: list[str]
    test_prompts: list[str]
    test_answers: list[str]
    grade: Callable[[str, str], bool]
    spec: object = None


def load_task(cfg) -> Task:
    """Build the task named by ``cfg.name`` (``arithmetic`` or ``local``)."""
    from trb_exp.data import arithmetic

    if cfg.name == "arithmetic":
        try:
            spec = arithmetic.ArithmeticSpec(
                min_operands=int(cfg.min_operands), max_operands=int(cfg.max_operands),
                max_operand=int(cfg.max_operand), ops=str(cfg.ops), train_size=int(cfg.train_size),
                test_size=int(cfg.test_size), seed=int(cfg.seed))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        splits = arithmetic.make_splits(spec)
        return Task(list(splits["train"]["prompt"]), list(splits["train"]["answer"]),
                    list(splits["test"]["prompt"]), list(splits["test"]["answer"]), arithmetic.grade, spec)
    if cfg.name == "local":
        train = _read_rows(cfg.train_file, cfg.prompt_field, cfg.answer_field, "dataset.train_file")
        test = _read_rows(cfg.test_file, cfg.prompt_field, cfg.answer_field, "dataset.test_file")
        return Task([r[0] for r in train], [r[1] for r in train], [r[0] for r in test], [r[1] for r in test],
                    arithmetic.grade)
    raise ConfigError(f"dataset.name={cfg.name!r}: choose arithmetic or local")


def _read_rows(path, prompt_field: str, answer_field: str, field: str) -> list[tuple[str, str]]:
    """(prompt, answer) rows of a local JSONL/JSON/Parquet file, with one-line errors."""
    from pathlib import Path

    from datasets import load_dataset

    if not path or not Path(path).is_file():
        raise ConfigError(f"{field}={path!r}: no such file; give a JSONL or Parquet file")
    kind = "parquet" if str(path).endswith(".parquet") else "json"
    if Path(path).stat().st_size == 0:
        raise ConfigError(f"{field}={path!r}: the file has no rows")
    try:
        ds = load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # malformed JSON, unreadable parquet
        raise ConfigError(f"{field}={path!r}: cannot be read as {kind} ({type(e).__name__})") from None
    if len(ds) == 0:
        raise ConfigError(f"{field}={path!r}: the file has no rows")
    for name in (prompt_field, answer_field):
        if name not in ds.column_names:
            raise ConfigError(f"{field}={path!r}: no column {name!r} (columns: {', '.join(ds.column_names)}); "
                              "set dataset.prompt_field / dataset.answer_field")
    rows = []
    for i, r in enumerate(ds):
        p, a = r[prompt_field], r[answer_field]
        if not isinstance(p, str) or not p or a is None:
            raise ConfigError(f"{field}={path!r}: row {i} has an empty or non-text {prompt_field!r}/{answer_field!r}")
        rows.append((p, str(a)))
    return rows
