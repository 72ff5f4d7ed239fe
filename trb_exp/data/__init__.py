"""Tasks, encoders and graders. The embedded task lives in ``arithmetic``."""

from __future__ import annotations

import functools
import random
import sys

import torch


def encode_prompts(tokenizer, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask [B, P] (the tokenizer adds BOS if it has one)."""
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt", padding_side="left")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def pad_right(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [B, T] from id lists, and the bool mask of real tokens."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


def encode_targets(tokenizer, targets: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded response ids [B, T] ending with EOS, and the mask of real tokens."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in targets]
    return pad_right(rows, tokenizer.pad_token_id, device)


# --------------------------------------------------------------------------- tasks
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

from trb_exp import CONF_DIR as _CONF  # noqa: E402
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
    name: str = "test"
    val_prompts: list[str] = field(default_factory=list)  # the validation split (arithmetic: dataset.val_size)
    val_answers: list[str] = field(default_factory=list)


@dataclass
class Benchmark:
    """One evaluation set: problems, references, its grader and its paper sample count n."""

    name: str
    prompts: list[str]
    answers: list[str]
    grade: Callable[[str, str], bool]
    n_samples: int = 4


def _grader(cfg, default: str, where: str):
    from trb_exp.data.grading import get_grader

    try:
        return get_grader(str(cfg.get("grader", default)))
    except ValueError as e:
        raise ConfigError(f"{where}.{e}") from None


def load_task(cfg) -> Task:
    """Build the task named by ``cfg.name`` (``arithmetic``, ``local`` or ``hf``)."""
    from trb_exp.data import arithmetic

    if cfg.name == "arithmetic":
        try:
            spec = arithmetic.ArithmeticSpec(
                min_operands=int(cfg.min_operands), max_operands=int(cfg.max_operands),
                max_operand=int(cfg.max_operand), ops=str(cfg.ops), train_size=int(cfg.train_size),
                test_size=int(cfg.test_size), seed=int(cfg.seed))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        val_size = cfg.get("val_size", 0)
        if not isinstance(val_size, int) or isinstance(val_size, bool) or val_size < 0:
            raise ConfigError(f"dataset.val_size={val_size!r}: give an integer >= 0 (0 = no validation split)")
        splits = arithmetic.make_splits(spec)
        train_p, test_p = list(splits["train"]["prompt"]), list(splits["test"]["prompt"])
        val = arithmetic.make_validation(spec, val_size, set(train_p) | set(test_p))
        return Task(train_p, list(splits["train"]["answer"]), test_p, list(splits["test"]["answer"]),
                    arithmetic.grade, spec, name="arithmetic", val_prompts=list(val["prompt"]),
                    val_answers=list(val["answer"]))
    if cfg.name == "local":
        grade = _grader(cfg, "exact", "dataset")
        train, test = _local_rows(cfg, "train_file"), _local_rows(cfg, "test_file")
        return Task([r[0] for r in train], [r[1] for r in train], [r[0] for r in test], [r[1] for r in test],
                    grade, name="local")
    if cfg.name == "hf":
        from trb_exp.data.hub import load_rows

        train_p, train_a = load_rows(cfg, "dataset")
        test_p, test_a = ([], [])
        # the held-out split: test_files, or the hub's test_split unless the training rows are local files
        if cfg.get("test_files") or (cfg.get("test_split") and not cfg.get("data_files")):
            test_p, test_a = load_rows(cfg, "dataset", test=True)
        return Task(train_p, train_a, test_p, test_a, _grader(cfg, "math", "dataset"),
                    name=str(cfg.get("label") or "test"))
    raise ConfigError(f"dataset.name={cfg.name!r}: choose arithmetic, local or hf")


def _local_rows(cfg, key: str) -> list[tuple[str, str]]:
    """The (prompt, answer) rows of ``dataset.<key>``, every answer checked against ``dataset.grader``."""
    rows, lines = _read_rows(cfg[key], cfg.prompt_field, cfg.answer_field, f"dataset.{key}")
    check_answers(rows, lines, str(cfg.get("grader", "exact")), cfg[key], f"dataset.{key}")
    return rows


CONF_DIR = Path(_CONF)


def benchmark_config(entry, where: str):
    """A benchmark entry of ``eval.benchmarks``: a name of ``conf/dataset/`` (``math500``) or a dict
    ``{config: math500, <overrides>...}`` (e.g. ``data_files``, ``eval_samples``, ``limit``)."""
    from omegaconf import DictConfig, OmegaConf

    overrides = {}
    if isinstance(entry, (dict, DictConfig)):
        overrides = {k: v for k, v in dict(entry).items() if k != "config"}
        entry = entry.get("config")
    path = CONF_DIR / "dataset" / f"{entry}.yaml"
    if not entry or not path.is_file():
        names = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
        raise ConfigError(f"{where}={entry!r}: no such benchmark config; choose one of {', '.join(names)}")
    cfg = OmegaConf.merge(OmegaConf.load(path), overrides)
    if cfg.get("label") is None:
        cfg.label = str(entry)
    return cfg


def load_benchmark(cfg, where: str, test: bool = False) -> Benchmark:
    """A ``Benchmark`` from a dataset config: hf sources read their ``split`` (their held-out split
    when ``test``); ``arithmetic``/``local`` give their test split."""
    if cfg.name != "hf":
        task = load_task(cfg)
        return Benchmark(task.name, task.test_prompts, task.test_answers, task.grade,
                         int(cfg.get("eval_samples", 4)))
    from trb_exp.data.hub import load_rows

    prompts, answers = load_rows(cfg, where, test=test)
    return Benchmark(str(cfg.get("label") or "benchmark"), prompts, answers, _grader(cfg, "math", where),
                     int(cfg.get("eval_samples", 4)))


def load_benchmarks(entries, where: str = "eval.benchmarks") -> list[Benchmark]:
    return [load_benchmark(benchmark_config(e, f"{where}[{i}]"), f"{where}[{i}]") for i, e in enumerate(entries or [])]


# --------------------------------------------------------------------------- prompt formatting
def prompt_formatter(tokenizer, model_cfg) -> Callable[[str], str]:
    """The text a problem is shown as, decided by ``model.chat_template`` (``auto``: the student
    tokenizer's chat template when it has one, else the plain format; ``none``: the plain format),
    ``model.system_prompt`` (null: none) and ``model.plain_template`` (``{prompt}`` is replaced).

    The prompt is rendered and encoded ONCE with the student's tokenizer, and the same ids are fed
    to both models: in OPD the teacher scores exactly the student's context."""
    mode = str(model_cfg.get("chat_template", "none"))
    system = model_cfg.get("system_prompt") or None
    plain = str(model_cfg.get("plain_template", "{prompt}"))
    if mode not in ("auto", "none", "chat"):
        raise ConfigError(f"model.chat_template={mode!r}: use auto, chat or none")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "chat" and not has_template:
        raise ConfigError("model.chat_template='chat': the student's tokenizer has no chat template; "
                          "use model.chat_template=auto or none (plain format)")
    if mode == "none" or not has_template:
        if "{prompt}" not in plain:
            raise ConfigError(f"model.plain_template={plain!r}: must contain {{prompt}}")
        return lambda p: (f"{system}\n\n" if system else "") + plain.replace("{prompt}", p)
    kwargs = dict(model_cfg.get("chat_template_kwargs") or {})
    bos = tokenizer.bos_token
    # a tokenizer that prepends BOS itself would double a BOS the template writes as text
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]

    def fmt(p: str) -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
        return text[len(bos):] if adds_bos and text.startswith(bos) else text

    return fmt


def _check_json_lines(path: Path, field: str) -> list[int] | None:
    """A JSONL file: the first line that is not UTF-8 text or not one JSON object, by number. Returns the
    line number of each row (blank lines hold none); None for a JSON array file (left to the reader)."""
    import json

    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                raise ConfigError(f"{field}={str(path)!r}: line {n} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                  f"column {e.start + 1}); save the file as UTF-8") from None
            if n == 1 and text.startswith("["):
                return None
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{field}={str(path)!r}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{field}={str(path)!r}: line {n} is not a JSON object (one row per line)")
            rows.append(n)
    return rows


def check_answers(rows: list[tuple[str, str]], lines: list[int] | None, grader: str, path, field: str) -> None:
    """Every reference answer is one the grader in use can grade: an integer for ``exact`` (the arithmetic
    task's grader), an expression math-verify parses (not NaN) for ``math``; one line naming the first that
    is not."""
    from trb_exp.data.grading import ungradable

    for i, (_, answer) in enumerate(rows):
        fix = ungradable(answer, grader)
        if fix is not None:
            where = f"line {lines[i]}" if lines else f"row {i}"
            raise ConfigError(f"{field}={str(path)!r}: {where}: answer {answer!r} can never be graded; {fix}")


def check_prompts(tokenizer, prompts: list[str], where: str, max_positions: int | None,
                  max_new_tokens: int | None = None, clip: bool = False,
                  field: str = "trainer.max_new_tokens", model: str = "student") -> int | None:
    """Every rendered prompt encodes without unknown tokens and leaves room for a response within the
    ``max_positions`` of ``model`` (the one with the fewest): one line naming the first that does not. With
    ``max_new_tokens``: the longest prompt plus ``max_new_tokens`` must fit too, else one line with the numbers,
    or (``clip``) one warning line and the largest ``max_new_tokens`` that fits, which is returned
    (``max_new_tokens`` otherwise)."""
    if not prompts:
        return max_new_tokens
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    unk = tokenizer.unk_token_id
    for i, row in enumerate(ids):
        if unk is not None and unk in row:
            bad = sorted({c for c in prompts[i] if tokenizer(c, add_special_tokens=False)["input_ids"] in ([unk], [])})
            raise ConfigError(f"{where}: prompt {i} has text the student's tokenizer cannot encode "
                              f"({''.join(bad)[:20]!r} would become <unk>); the embedded character-level tokenizer "
                              "knows only the arithmetic task's characters: use a real model (model=hf) for other text")
    if not max_positions:
        return max_new_tokens
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    n = len(ids[longest])
    if n >= max_positions:
        raise ConfigError(f"{where}: prompt {longest} is {n} tokens, no room for a response in the "
                          f"{model}'s {max_positions} positions (max_position_embeddings); shorten or drop such prompts")
    if max_new_tokens is None or n + max_new_tokens <= max_positions:
        return max_new_tokens
    room = max_positions - n
    if not clip:
        raise ConfigError(f"{field}={max_new_tokens}: {where}: prompt {longest} is {n} tokens, and {n} + "
                          f"{max_new_tokens} = {n + max_new_tokens} is beyond the {model}'s {max_positions} positions "
                          f"(max_position_embeddings); give {field}={room} or less, or "
                          f"{field.rsplit('.', 1)[0]}.clip_max_new_tokens=true to clip it")
    print(f"[warning] {field}={max_new_tokens} clipped to {room}: {where}: prompt {longest} is {n} tokens of the "
          f"{model}'s {max_positions} positions", file=sys.stderr, flush=True)
    return room


def _read_rows(path, prompt_field: str, answer_field: str, field: str) -> tuple[list[tuple[str, str]], list[int] | None]:
    """(prompt, answer) rows of a local JSONL/JSON/Parquet file, with one-line errors, and the line number of
    each row (a JSONL file; else None)."""
    from pathlib import Path

    from datasets import load_dataset

    if not path or not Path(path).is_file():
        raise ConfigError(f"{field}={path!r}: no such file; give a JSONL or Parquet file")
    kind = "parquet" if str(path).endswith(".parquet") else "json"
    if Path(path).stat().st_size == 0:
        raise ConfigError(f"{field}={path!r}: the file has no rows")
    lines = _check_json_lines(Path(path), field) if kind == "json" else None
    try:
        ds = load_dataset(kind, data_files=str(path), split="train")
        ds[0]  # noqa: B018 -- a JSON array file's text is decoded here
    except Exception as e:  # malformed JSON, unreadable parquet, a JSON array file that is not UTF-8
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
            where = f"line {lines[i]}" if lines else f"row {i}"
            raise ConfigError(f"{field}={path!r}: {where} has an empty or non-text {prompt_field!r}/{answer_field!r}")
        rows.append((p, str(a)))
    return rows, lines


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, n_prompts: int, epoch: int) -> list[int]:
    rng = random.Random(seed)
    for _ in range(epoch + 1):  # epoch e is the (e+1)-th shuffle of one seeded stream
        order = list(range(n_prompts))
        rng.shuffle(order)
    return order[::-1]


def prompt_batch(seed: int, step: int, n_prompts: int, per_step: int) -> list[int]:
    """The training prompts (indices) of step ``step``: consecutive slices of a seeded shuffle of the
    training split, reshuffled every epoch. A pure function of (seed, step), so a warm start can
    look ahead at the prompts of the first N steps without changing what the steps draw."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n_prompts)
        out.append(_epoch_order(seed, n_prompts, epoch)[i])
    return out
