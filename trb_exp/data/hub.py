"""Hugging Face datasets as prompt sources and benchmarks (``dataset.name: hf``).

One config (a file of ``conf/dataset/``) names one source: a hub dataset (``path``, ``subset``,
``split``, read with ``datasets.load_dataset``) or local JSONL/JSON/Parquet files in the same schema
(``data_files``, which then replaces the hub). Column mapping:

    prompt_field     the question column; with ``format: conversations`` the conversation column
                     (OpenThoughts3: a list of {from, value} turns; the first user/human turn is the prompt)
    answer_field     the reference column (null: no reference, e.g. OpenThoughts3; the reward is then 0)
    answer_extract   gsm8k (text after '####'), boxed (last \\boxed{}), none (the field is the answer)
    filter           {column: value} rows to keep (e.g. {domain: math})
    limit            keep this many rows after a seeded shuffle (``shuffle_seed``); null = all

Lists (OlympiadBench's ``final_answer``) give their first element; numbers (AMC's float answers)
give their shortest exact text (142.0 -> 142).
"""

from __future__ import annotations

import os
from pathlib import Path

from trb_exp.config import ConfigError
from trb_exp.data.grading import extract_reference

FORMATS = ("text", "conversations")
EXTRACTS = ("gsm8k", "boxed", "none")
USER_ROLES = ("user", "human")


def _answer_text(value) -> str | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def first_user_turn(turns) -> str | None:
    """The first user turn of a conversation: OpenThoughts3's ``{from: human, value}`` or the
    ``{role: user, content}`` messages format."""
    for t in turns or []:
        if not isinstance(t, dict):
            continue
        role = t.get("from", t.get("role"))
        if role in USER_ROLES:
            return t.get("value", t.get("content"))
    return None


def _open(cfg, where: str):
    from datasets import load_dataset

    files = cfg.get("data_files")
    if files:
        files = [str(f) for f in files] if not isinstance(files, str) else [files]
        for f in files:
            if not Path(f).is_file():
                raise ConfigError(f"{where}.data_files={f!r}: no such file; give JSONL, JSON or Parquet files")
            if Path(f).stat().st_size == 0:
                raise ConfigError(f"{where}.data_files={f!r}: the file has no rows")
        kind = "parquet" if files[0].endswith(".parquet") else "json"
        try:
            return load_dataset(kind, data_files=files, split="train")
        except Exception as e:
            raise ConfigError(f"{where}.data_files={files[0]!r}: cannot be read as {kind} ({type(e).__name__})") from None
    path, subset, split = cfg.get("path"), cfg.get("subset"), cfg.get("split") or "train"
    if not path:
        raise ConfigError(f"{where}.path=None: give a hub dataset id or local files ({where}.data_files=FILE.jsonl)")
    try:
        return load_dataset(str(path), subset, split=split)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False") or \
            os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (offline mode is on)" if offline else ""
        raise ConfigError(
            f"{where}: cannot load {path!r} subset={subset!r} split={split!r}{hint}: {first}; download it "
            f"(`hf download --repo-type dataset {path}`) or point {where}.data_files at a local JSONL/Parquet copy"
        ) from None


def load_rows(cfg, where: str = "dataset", test: bool = False) -> tuple[list[str], list[str]]:
    """(prompts, reference answers) of one source; ``test``: its held-out split (``test_split`` /
    ``test_files``) instead of ``split`` / ``data_files``."""
    if test:
        from omegaconf import OmegaConf

        cfg = OmegaConf.merge(cfg, {"split": cfg.get("test_split"), "data_files": cfg.get("test_files")})
    fmt = str(cfg.get("format", "text"))
    extract = str(cfg.get("answer_extract", "none"))
    if fmt not in FORMATS:
        raise ConfigError(f"{where}.format={fmt!r}: choose one of {', '.join(FORMATS)}")
    if extract not in EXTRACTS:
        raise ConfigError(f"{where}.answer_extract={extract!r}: choose one of {', '.join(EXTRACTS)}")
    ds = _open(cfg, where)
    pf, af = str(cfg.prompt_field), cfg.get("answer_field")
    for name in [pf] + ([str(af)] if af else []):
        if name not in ds.column_names:
            raise ConfigError(f"{where}: no column {name!r} (columns: {', '.join(ds.column_names)}); "
                              f"set {where}.prompt_field / {where}.answer_field")
    for col, value in dict(cfg.get("filter") or {}).items():
        if col not in ds.column_names:
            raise ConfigError(f"{where}.filter: no column {col!r} (columns: {', '.join(ds.column_names)})")
        ds = ds.filter(lambda v, value=value: v == value, input_columns=[col])
    limit = cfg.get("limit")
    if limit is not None and int(limit) < len(ds):
        ds = ds.shuffle(seed=int(cfg.get("shuffle_seed", 0))).select(range(int(limit)))
    if len(ds) == 0:
        raise ConfigError(f"{where}: no rows (after filter/limit)")
    prompts, answers = [], []
    for i, row in enumerate(ds):
        p = first_user_turn(row[pf]) if fmt == "conversations" else row[pf]
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"{where}: row {i} has no {'user turn in ' if fmt == 'conversations' else ''}"
                              f"text in {pf!r}")
        a = _answer_text(row[str(af)]) if af else None
        prompts.append(p)
        answers.append("" if a is None else extract_reference(a, extract))
    return prompts, answers
