"""``setup(cfg) -> Experiment``: everything a run reads but never changes, built in one place from the
composed config and shared by ``trb_exp.train`` and ``trb_exp.evaluate``.

An ``Experiment`` holds the device, the method, the task's training prompts (rendered once with the
prompt format), the benchmarks (rendered, cut to the configured size, each with its own sample count
n), the tokenizer(s), the student, the teacher (training only) and the end-of-sequence ids. What
changes while training (weights, optimizer, RNG streams, step) lives in ``state.TrainState``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers

from omegaconf import OmegaConf

from trb_exp.config import ConfigError, check_ks, validate_eval
from trb_exp.distributed import DistContext
from trb_exp.data import Benchmark, check_prompts, load_benchmark, load_benchmarks, load_task, prompt_formatter
from trb_exp.methods import Method
from trb_exp.prepare import embedded_pair_dir
from trb_exp.decode.rollout import eager_kwargs, sample_kwargs
from trb_exp.models import (check_available, check_pair, eos_ids, load_model, load_tokenizer,
                            max_positions, pair_eos_ids, pick_device, set_vocab_size)


@dataclass
class Experiment:
    cfg: object
    device: torch.device
    tok: object
    student: torch.nn.Module
    benchmarks: list[Benchmark]
    eos_id: int
    eos_ids: tuple[int, ...]
    method: Method | None = None
    teacher: torch.nn.Module | None = None
    train_prompts: list[str] = field(default_factory=list)
    train_answers: list[str] = field(default_factory=list)
    grade: Callable[[str, str], bool] | None = None
    teacher_pass: str = "rollout"
    rollout_kw: dict = field(default_factory=dict)  # rollout.* as keyword arguments of rollout.sample
    sparse_teacher: bool = False  # rollout.teacher_stats=topk: the loss gets the teacher on the top-k ids only
    dist: DistContext = field(default_factory=DistContext)  # this process's rank under torchrun
    train_student: torch.nn.Module | None = None  # the student as the loss sees it (DDP-wrapped under torchrun)
    # objects that change while training and must survive a resume (a budget controller, say): each has
    # state_dict() / load_state_dict(); train.run puts them in TrainState.extras under the same name, so
    # checkpoints save and restore them with everything else
    stateful: dict = field(default_factory=dict)
    validation: Benchmark | None = None  # the task's validation split (dataset.val_size), scored as val/<metric>


def is_char_tokenizer(tok) -> bool:
    """The embedded task's character-level tokenizer (``data.tokenizer.build_char_tokenizer``)."""
    from trb_exp.data.tokenizer import CHARS, SPECIAL_TOKENS

    return set(tok.get_vocab()) == set(SPECIAL_TOKENS) | set(CHARS)


def _start(cfg) -> torch.device:
    transformers.utils.logging.disable_progress_bar()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return pick_device(cfg.device)


def pick_engine(rollout_kw: dict, student, teacher) -> dict:
    """``rollout.engine=auto`` (the default): the static engine when it can run both models (Llama, Qwen2/3,
    Mistral), else the eager loop, said in one line; ``static`` on another architecture is a one-line error."""
    from trb_exp.decode.static_lm import UnsupportedModel, check_supported

    if rollout_kw["engine"] == "eager":
        return rollout_kw
    for name, model in (("model.student", student), ("model.teacher", teacher)):
        try:
            check_supported(model)
        except UnsupportedModel as e:
            if rollout_kw["engine"] == "static":
                raise ConfigError(f"{name}: {e}") from None
            print(f"[rollout] rollout.engine=auto: {name} is not an architecture the static engine runs; "
                  "decoding with the eager loop", flush=True)
            return eager_kwargs(rollout_kw)
    return rollout_kw | {"engine": "static"}


def setup(cfg) -> Experiment:
    """The training experiment of ``cfg`` (already validated): method, task, benchmarks, the pair."""
    method = Method.from_cfg(cfg.method, cfg.schedule)
    device = _start(cfg)
    mc = cfg.model
    teacher_pass = str(mc.get("teacher_pass", "rollout"))
    if teacher_pass not in ("rollout", "micro_batch"):
        raise ConfigError(f"model.teacher_pass={teacher_pass!r}: use rollout or micro_batch")
    rollout_kw = sample_kwargs(cfg, method.topk)  # rollout.engine and its knobs, rollout.teacher_stats
    if rollout_kw["teacher_stats"] == "auto":  # topk where the method's loss allows it (the paper presets), else full
        rollout_kw["teacher_stats"] = "topk" if method.sparse_teacher_ok else "full"
    sparse = rollout_kw["teacher_stats"] == "topk" and method.needs_teacher_logprobs
    if sparse and not method.sparse_teacher_ok:
        raise ConfigError(f"rollout.teacher_stats=topk: method {method.name} needs the full teacher distribution "
                          "(topk needs loss=reverse_kl, estimator topk or sampled, b_start=1); use rollout.teacher_stats=full")
    # a hub id that cannot be loaded (offline, not cached) stops the run here, in milliseconds
    check_available(str(mc.student), "model.student")
    check_available(str(mc.teacher), "model.teacher")

    task = load_task(cfg.dataset)
    ev = cfg.get("eval") or {}
    benchmarks = load_benchmarks(ev.get("benchmarks"))
    if not benchmarks and not task.test_prompts:
        raise ConfigError(f"eval.benchmarks=[]: dataset {task.name!r} has no test split; name the benchmarks "
                          "to evaluate on, e.g. eval.benchmarks=[math500,aime24]")
    uses_embedded = any(str(n).startswith("embedded:") for n in (mc.student, mc.teacher))
    emb = embedded_pair_dir(task.spec, str(mc.get("embedded_pair", "a"))) if uses_embedded and task.spec is not None else None
    tok = load_tokenizer(mc.student, mc.trust_remote_code, emb, field="model.student")
    teacher_tok = load_tokenizer(mc.teacher, mc.trust_remote_code, emb, field="model.teacher")
    # one rendering of every prompt (chat template / plain format), encoded with the student's tokenizer;
    # checked (encodable, short enough) before any model is loaded
    fmt = prompt_formatter(tok, mc)
    if not benchmarks:
        benchmarks = [Benchmark(task.name, task.test_prompts, task.test_answers, task.grade)]
    size = cfg.trainer.eval_size
    # each benchmark keeps its own n (trainer.eval_samples=null evaluates it at that n)
    benchmarks = [Benchmark(b.name, [fmt(p) for p in b.prompts[:size]], b.answers[:size], b.grade, b.n_samples)
                  for b in benchmarks]
    train_prompts = [fmt(p) for p in task.train_prompts]
    validation = Benchmark("val", [fmt(p) for p in task.val_prompts[:size]], list(task.val_answers[:size]),
                           task.grade) if task.val_prompts else None  # cut like the test set
    positions = max_positions(mc.student, emb, mc.trust_remote_code)
    check_prompts(tok, train_prompts, f"dataset ({task.name}, training prompts)", positions)
    for b in benchmarks + ([validation] if validation else []):
        check_prompts(tok, b.prompts, f"benchmark {b.name}", positions)
    student = load_model(mc.student, device=device, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code,
                         train=True, embedded_dir=emb, gradient_checkpointing=bool(mc.get("gradient_checkpointing")),
                         field="model.student")
    teacher_device = pick_device(mc.get("teacher_device") or str(device))
    teacher = load_model(mc.teacher, device=teacher_device, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code,
                         train=False, embedded_dir=emb, field="model.teacher")
    vocab = check_pair(tok, teacher_tok, student, teacher)
    set_vocab_size(student, vocab)  # padded embeddings: compare both models on the tokenizer's vocabulary
    set_vocab_size(teacher, vocab)
    rollout_kw = pick_engine(rollout_kw, student, teacher)
    # different EOS ids (Base student, instruct teacher): one merged end-of-sequence event at the student's id
    eos_id, all_eos = pair_eos_ids(tok, teacher_tok, student, teacher)
    return Experiment(cfg=cfg, device=device, tok=tok, student=student, benchmarks=benchmarks, eos_id=eos_id,
                      eos_ids=all_eos, method=method, teacher=teacher,
                      train_prompts=train_prompts, train_answers=list(task.train_answers),
                      grade=task.grade, teacher_pass=teacher_pass, rollout_kw=rollout_kw, sparse_teacher=sparse,
                      stateful=method.stateful(), validation=validation)


def setup_eval(cfg) -> Experiment:
    """The scoring experiment of ``trb_exp.evaluate``: ``model.student`` alone, the ``dataset`` benchmark
    (its held-out split for a training source) followed by ``eval.benchmarks``, cut to ``eval.size``."""
    validate_eval(cfg)
    device = _start(cfg)
    ev, mc = cfg.eval, cfg.model
    name = str(mc.student)
    check_available(name, "model.student")
    # a benchmark config: its split; a training source with a held-out split (gsm8k_train): that split
    d = cfg.dataset
    held_out = d.name == "hf" and bool(d.get("test_files") or (d.get("test_split") and not d.get("data_files")))
    first = load_benchmark(cfg.dataset, "dataset", test=held_out)
    benchmarks = [first, *load_benchmarks(ev.benchmarks)]
    emb = None
    if name.startswith("embedded:") and cfg.dataset.name == "arithmetic":
        emb = embedded_pair_dir(load_task(cfg.dataset).spec, str(mc.get("embedded_pair", "a")))
    tok = load_tokenizer(name, mc.trust_remote_code, emb, field="model.student")
    if cfg.dataset.name == "arithmetic" and is_char_tokenizer(tok) and str(mc.get("plain_template")) != "{prompt}":
        # a student trained on the embedded task: its prompts are the task's own text, not the hub format
        mc = OmegaConf.merge(mc, {"chat_template": "none", "system_prompt": None, "plain_template": "{prompt}"})
        print("[evaluate] the embedded character-level tokenizer: scoring with the embedded task's prompt format "
              "(model=embedded)", flush=True)
    fmt = prompt_formatter(tok, mc)
    size = ev.get("size")
    n = ev.get("samples")
    benchmarks = [Benchmark(b.name, [fmt(p) for p in b.prompts[:size]], b.answers[:size], b.grade, int(n or b.n_samples))
                  for b in benchmarks]
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.benchmarks: {names} names a benchmark twice; give each entry its own label")
    check_ks(None if ev.get("ks") is None else [int(k) for k in ev.ks], benchmarks)
    positions = max_positions(name, emb, mc.trust_remote_code)
    for b in benchmarks:
        check_prompts(tok, b.prompts, f"benchmark {b.name}", positions)
    model = load_model(name, device=device, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code, train=False,
                       embedded_dir=emb, field="model.student")
    rows = model.get_output_embeddings().weight.shape[0]
    set_vocab_size(model, len(tok) if rows > len(tok) else None)  # never sample a padding row
    ids = tuple(eos_ids(tok, model))
    return Experiment(cfg=cfg, device=device, tok=tok, student=model, benchmarks=benchmarks,
                      eos_id=int(tok.eos_token_id), eos_ids=ids)
