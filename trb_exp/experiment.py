"""``setup(cfg) -> Experiment``: everything a run reads but never changes, built in one place from the
composed config and shared by ``trb_exp.train`` and ``trb_exp.evaluate``. An ``Experiment`` is frozen: the
trainer's ``build`` derives the distributed one with ``dataclasses.replace``.

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
from trb_exp.decode.backend import resolve_engine
from trb_exp.decode.config import RolloutConfig
from trb_exp.models import (check_available, check_pair, eos_ids, load_model, load_tokenizer,
                            max_positions, pair_eos_ids, pick_device, set_vocab_size)


@dataclass(frozen=True)
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
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # the decode backend, its knobs, the teacher's stats
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


def _config_of(name, emb) -> dict:
    """A model's config.json as a dict (a local or embedded directory, or a cached hub id), without its weights."""
    from trb_exp.models import resolve

    cfg = transformers.AutoConfig.from_pretrained(resolve(str(name), emb), trust_remote_code=False)
    return cfg.to_dict()


def setup(cfg, method: Method | None = None, rollout: RolloutConfig | None = None) -> Experiment:
    """The training experiment of ``cfg`` (already validated): method, task, benchmarks, the pair. ``method`` and
    ``rollout``: as ``trainer.accept`` built them from ``cfg`` (built here when not given)."""
    method = method or Method.from_cfg(cfg.method, cfg.schedule)
    rollout = rollout or RolloutConfig.from_cfg(cfg, method)
    device = _start(cfg)
    mc = cfg.model
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
    # the teacher scores every position the student samples: the pair's context is the shorter of the two
    positions, model = max_positions(mc.student, emb, mc.trust_remote_code), "student"
    teacher_positions = max_positions(mc.teacher, emb, mc.trust_remote_code)
    if teacher_positions and (not positions or teacher_positions < positions):
        positions, model = teacher_positions, "teacher"
    tr, new_tokens = cfg.trainer, int(cfg.trainer.max_new_tokens)
    scored = benchmarks + ([validation] if validation else [])
    for prompts, where in [(train_prompts, f"dataset ({task.name}, training prompts)"),
                           *[(b.prompts, f"benchmark {b.name}") for b in scored]]:
        new_tokens = check_prompts(tok, prompts, where, positions, new_tokens, bool(tr.get("clip_max_new_tokens")),
                                   model=model)
    if new_tokens != tr.max_new_tokens:  # clipped (one warning line said so): the loop and evaluations read it
        tr.max_new_tokens = new_tokens
    if rollout.engine in ("vllm", "auto"):  # configs only: a pair vLLM cannot run stops here, in one line
        from trb_exp.decode.vllm import resolve_vllm

        rollout = resolve_vllm(rollout, method, _config_of(mc.student, emb), _config_of(mc.teacher, emb), device)
    student = load_model(mc.student, device=device, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code,
                         train=True, embedded_dir=emb, gradient_checkpointing=bool(mc.get("gradient_checkpointing")),
                         field="model.student")
    teacher_device = pick_device(mc.get("teacher_device") or str(device))
    teacher = load_model(mc.teacher, device=teacher_device, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code,
                         train=False, embedded_dir=emb, field="model.teacher")
    vocab = check_pair(tok, teacher_tok, student, teacher)
    set_vocab_size(student, vocab)  # padded embeddings: compare both models on the tokenizer's vocabulary
    set_vocab_size(teacher, vocab)
    rollout = resolve_engine(rollout, student, teacher)
    if rollout.engine == "vllm":  # this process's vLLM engine (built on first use; decode/vllm.py)
        from trb_exp.decode.vllm import open_rollouts

        open_rollouts(cfg, rollout, student, teacher, tok, vocab, method)
    # different EOS ids (Base student, instruct teacher): one merged end-of-sequence event at the student's id
    eos_id, all_eos = pair_eos_ids(tok, teacher_tok, student, teacher)
    return Experiment(cfg=cfg, device=device, tok=tok, student=student, benchmarks=benchmarks, eos_id=eos_id,
                      eos_ids=all_eos, method=method, teacher=teacher,
                      train_prompts=train_prompts, train_answers=list(task.train_answers),
                      grade=task.grade, rollout=rollout,
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
    positions, new_tokens = max_positions(name, emb, mc.trust_remote_code), int(ev.max_new_tokens)
    for b in benchmarks:  # prompt + eval.max_new_tokens within the student's positions: refused, or clipped
        new_tokens = check_prompts(tok, b.prompts, f"benchmark {b.name}", positions, new_tokens,
                                   bool(ev.get("clip_max_new_tokens")), field="eval.max_new_tokens")
    if new_tokens != ev.max_new_tokens:  # clipped (one warning line said so)
        ev.max_new_tokens = new_tokens
    model = load_model(name, device=device, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code, train=False,
                       embedded_dir=emb, field="model.student")
    rows = model.get_output_embeddings().weight.shape[0]
    set_vocab_size(model, len(tok) if rows > len(tok) else None)  # never sample a padding row
    ids = tuple(eos_ids(tok, model))
    return Experiment(cfg=cfg, device=device, tok=tok, student=model, benchmarks=benchmarks,
                      eos_id=int(tok.eos_token_id), eos_ids=ids)
