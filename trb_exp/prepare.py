"""Build the embedded teacher/student pair deterministically.

    python -m trb_exp.prepare                 # rebuild the shipped pair in trb_exp/assets/embedded
    python -m trb_exp.prepare --pair b        # the second miniature pair, in trb_exp/assets/embedded_b
    python -m trb_exp.prepare --pair c --threads 1   # c, d, e: the generalisation study's pairs (head_dim 32),
                                                     # in trb_exp/assets/embedded_<pair>; cost: prepare.json "seconds"
                                                     # (wall) and "cpu_seconds", over every attempt

A build saves its progress every 100 SFT steps under $TRB_EXP_CACHE/building-<key> (default
~/.cache/trb_exp): the same command after an interruption continues it, bit for bit.
    python -m trb_exp.prepare --out DIR       # somewhere else

Teacher: a 4-layer Llama trained by SFT on the task's worked solutions until its sampled
(temperature 1) pass@1 on the test split reaches ``teacher_target``.
Student: a smaller Llama playing the paper's *Base* model. It is pretrained on a corpus that
teaches the task's language but not the task: bare step lines (``7*8=56;``) and prompts followed
by the correct worked solution of a DIFFERENT problem. It therefore writes well-formed,
self-consistent solutions that ignore its prompt, and solves few problems; on-policy distillation
has to teach it to ground its steps in the prompt.
"""

from __future__ import annotations

if __name__ == "__main__":  # a bad --out stops in a second, before torch is imported
    import sys

    from trb_exp.config import ConfigError
    from trb_exp.preflight import check_out_dir

    _argv = sys.argv[1:]
    for out in [a.split("=", 1)[1] for a in _argv if a.startswith("--out=")] + \
               [_argv[i + 1] for i, a in enumerate(_argv[:-1]) if a == "--out"]:
        try:
            check_out_dir(out)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

import argparse
import hashlib
import json
import os
import sys
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trb_exp.data import encode_prompts, encode_targets
from trb_exp.data.arithmetic import ArithmeticSpec, grade, make_splits, solve
from trb_exp.data.tokenizer import build_char_tokenizer
from trb_exp.evaluation import evaluate
from trb_exp.losses import cross_entropy, masked_token_mean
from trb_exp.models import embedded_dir_of, tiny_llama
from trb_exp.optim import accumulate_step, adamw
from trb_exp.decode.record import positions_from_mask


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class PairSpec:
    task: ArithmeticSpec = field(default_factory=ArithmeticSpec)
    teacher: ModelSize = ModelSize(hidden=128, layers=4, heads=4, intermediate=384)
    student: ModelSize = ModelSize(hidden=96, layers=3, heads=4, intermediate=256)
    teacher_steps: int = 3000
    teacher_target: float = 0.92
    student_steps: int = 1600
    student_grounded_frac: float = 0.0  # share of student corpus rows whose solution matches the prompt
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


# The named embedded pairs (``model.embedded_pair``), one per miniature setting, the way the paper has
# two Qwen3 pairs. "a" is the project default; "b" is larger on both sides (teacher 1.3M <- student
# 0.6M against 0.86M <- 0.33M) with its own seeds, mirroring the paper's 1.7B <- 8B setting.
PAIRS: dict[str, PairSpec] = {
    "a": PairSpec(),
    "b": PairSpec(
        teacher=ModelSize(hidden=160, layers=4, heads=4, intermediate=480),
        student=ModelSize(hidden=128, layers=3, heads=4, intermediate=384),
        seed=1,
    ),
    # "a32": pair a with the student's 96 dimensions split into 3 heads of 32 instead of 4 of 24, so both towers
    # have head_dim 32, a size vLLM's CPU attention runs (rollout.engine=vllm; model=embedded_a32)
    "a32": PairSpec(student=ModelSize(hidden=96, layers=3, heads=3, intermediate=256)),
    # The generalisation study's settings (docs/results/generalisation/PLAN.md). Every tower has head_dim 32,
    # a head size vLLM's attention supports (a's student, head_dim 24, does not). Fewer teacher and student
    # steps than a and b, to keep each build near 20 minutes of one core.
    # c: a's teacher shape, a narrower and deeper student (64 x 4 layers, 2 heads).
    "c": PairSpec(
        teacher=ModelSize(hidden=128, layers=4, heads=4, intermediate=384),
        student=ModelSize(hidden=64, layers=4, heads=2, intermediate=192),
        teacher_steps=2000, student_steps=1200, seed=2,
    ),
    # d: a wider, shallower pair (teacher 192 x 3 layers, 6 heads <- student 128 x 2 layers, 4 heads).
    "d": PairSpec(
        teacher=ModelSize(hidden=192, layers=3, heads=6, intermediate=512),
        student=ModelSize(hidden=128, layers=2, heads=4, intermediate=320),
        teacher_steps=2000, student_steps=1000, seed=3,
    ),
    # e: a task variant, additions and subtractions of 3-5 operands (longer chains, no products);
    # conf/experiment/mini_e.yaml trains on the same task.
    "e": PairSpec(
        task=ArithmeticSpec(min_operands=3, max_operands=5, ops="+-"),
        teacher=ModelSize(hidden=128, layers=3, heads=4, intermediate=384),
        student=ModelSize(hidden=96, layers=2, heads=3, intermediate=256),
        teacher_steps=2000, student_steps=1200, seed=4,
    ),
}


def pair_spec(pair: str, task: ArithmeticSpec | None = None) -> PairSpec:
    """The PairSpec of a named pair, trained on ``task`` (default: the pair's own task)."""
    if pair not in PAIRS:
        from trb_exp.config import ConfigError
        raise ConfigError(f"model.embedded_pair={pair!r}: unknown pair; choose one of {sorted(PAIRS)}")
    return replace(PAIRS[pair], task=task if task is not None else PAIRS[pair].task)


def _save_progress(path: Path, state: dict) -> None:
    """Write a build's progress atomically (a half-written file is never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def _sft(model, tokenizer, rows, *, steps, batch_size, lr, seed, desc, prompt_loss, eval_fn=None, eval_every=250,
         target=None, progress: Path | None = None, save_every: int = 100, on_save=None):
    """Plain SFT: cross-entropy on (prompt, target) rows; the prompt is masked unless prompt_loss.
    ``progress``: a file the state (weights, AdamW, schedule, batch generator, history) is saved to every
    ``save_every`` steps and at the end (then ``on_save()``), and resumed from: an interrupted build
    continues bit for bit."""
    g = torch.Generator().manual_seed(seed)
    opt, sched = adamw(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01, warmup_steps=100, decay_steps=steps)
    model.train()
    history, first = [], 0
    if progress is not None and progress.is_file():
        st = torch.load(progress, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        g.set_state(st["gen"])
        history, first = list(st["history"]), int(st["step"])
        print(f"[{desc}] resumed from {progress} at step {first}" + (" (finished)" if st["done"] else ""), flush=True)
        if st["done"]:
            return history

    def save(step: int, done: bool) -> None:
        if progress is not None:
            _save_progress(progress, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                      "gen": g.get_state(), "history": history, "step": step, "done": done})
            if on_save is not None:
                on_save()
    bar = tqdm(range(first, steps), desc=desc, initial=first, total=steps)
    def batch_loss():  # one micro-batch: the whole batch, its token mean
        idx = torch.randint(len(rows), (batch_size,), generator=g).tolist()
        p_ids, p_mask = encode_prompts(tokenizer, [rows[i][0] for i in idx])
        t_ids, t_mask = encode_targets(tokenizer, [rows[i][1] for i in idx])
        ids = torch.cat([p_ids, t_ids], 1)
        attn = torch.cat([p_mask.bool(), t_mask], 1)
        pos = positions_from_mask(attn)
        logits = model(input_ids=ids, attention_mask=attn.long(), position_ids=pos).logits[:, :-1]
        loss_mask = torch.cat([p_mask.bool() & prompt_loss, t_mask], 1)[:, 1:]
        return masked_token_mean(cross_entropy(logits, ids[:, 1:]), loss_mask)

    for step in bar:
        loss, _ = accumulate_step(model, opt, sched, [batch_loss], grad_clip=1.0)
        bar.set_postfix(loss=f"{loss:.3f}")
        if eval_fn is not None and (step + 1) % eval_every == 0:
            score = eval_fn(model)
            history.append({"step": step + 1, "loss": loss, **score})
            bar.write(f"[{desc}] step {step + 1}: {score}")
            if target is not None and score["pass@1"] >= target:
                break
            model.train()
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save(step + 1, False)
    save(steps, True)
    return history


def student_corpus(train_rows, spec: PairSpec, rng: random.Random):
    """(prompt, text) rows: step-line drills and prompts with another problem's solution."""
    rows = []
    sols = [r["solution"] for r in train_rows]
    for r in train_rows:
        u = rng.random()
        if u < spec.student_grounded_frac:
            rows.append((r["prompt"], r["solution"]))
        elif u < 0.8:
            rows.append((r["prompt"], rng.choice(sols)))
        else:  # a drill of independent single-operation step lines
            steps = []
            for _ in range(rng.randint(2, 4)):
                a, b = rng.randint(-30, 99), rng.randint(0, spec.task.max_operand)
                op = rng.choice(spec.task.ops)
                steps.append(solve([a, b], [op])[0][0])
            rows.append(("", ";".join(steps) + ";"))
    return rows


def progress_dir(spec: PairSpec) -> Path:
    """Where an unfinished build of ``spec`` keeps its progress (outside the source tree)."""
    return Path(os.environ.get("TRB_EXP_CACHE", Path.home() / ".cache" / "trb_exp")) / f"building-{spec.key()}"


def prepare_pair(spec: PairSpec, out: Path, *, log=print) -> dict:
    """Train and save teacher and student (each dir self-contained with its tokenizer). An interrupted build
    resumes where it stopped (``progress_dir``); ``seconds`` counts the time of every attempt."""
    torch.manual_seed(spec.seed)
    t_start = time.time()
    work = progress_dir(spec)
    before = json.loads((work / "seconds.json").read_text()) if (work / "seconds.json").is_file() else {}
    c_start = time.process_time()

    def spent() -> dict:  # the build's wall and CPU seconds so far, over every attempt
        return {"seconds": round(before.get("seconds", 0.0) + time.time() - t_start, 1),
                "cpu_seconds": round(before.get("cpu_seconds", 0.0) + time.process_time() - c_start, 1)}

    def tick():
        (work / "seconds.json").write_text(json.dumps(spent()))

    splits = make_splits(spec.task)
    tok = build_char_tokenizer()
    test = splits["test"]
    prompts, answers = list(test["prompt"]), list(test["answer"])

    def eval_fn(model):
        r = evaluate(model, tok, prompts, answers, grade, n_samples=2, greedy=False, max_new_tokens=48, seed=spec.seed)
        return {"pass@1": round(r["pass@1"], 4), "eos_rate": round(r["eos_rate"], 4)}

    train_rows = [(r["prompt"], r["solution"]) for r in splits["train"]]
    teacher = tiny_llama(tok, seed=spec.seed, **asdict(spec.teacher))
    t_hist = _sft(teacher, tok, train_rows, steps=spec.teacher_steps, batch_size=spec.batch_size, lr=spec.lr,
                  seed=spec.seed, desc="teacher SFT", prompt_loss=False, eval_fn=eval_fn, target=spec.teacher_target,
                  progress=work / "teacher.pt", on_save=tick)
    t_final = evaluate(teacher, tok, prompts, answers, grade, n_samples=8, max_new_tokens=48, seed=spec.seed + 1)
    log(f"teacher: {t_final}")

    corpus = student_corpus(list(splits["train"]), spec, random.Random(spec.seed))
    student = tiny_llama(tok, seed=spec.seed + 1, **asdict(spec.student))
    s_hist = _sft(student, tok, corpus, steps=spec.student_steps, batch_size=spec.batch_size, lr=spec.lr,
                  seed=spec.seed + 1, desc="student pretrain", prompt_loss=True, progress=work / "student.pt",
                  on_save=tick)
    s_final = evaluate(student, tok, prompts, answers, grade, n_samples=8, max_new_tokens=48, seed=spec.seed + 1)
    log(f"student: {s_final}")

    out.mkdir(parents=True, exist_ok=True)
    for role, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(out / role)  # safetensors
        tok.save_pretrained(out / role)
    report = {
        "spec": asdict(spec), "key": spec.key(), **spent(),
        "teacher": {"params": sum(p.numel() for p in teacher.parameters()), "eval": t_final, "history": t_hist},
        "student": {"params": sum(p.numel() for p in student.parameters()), "eval": s_final, "history": s_hist},
    }
    (out / "prepare.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)  # built: the progress is no longer needed
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="a", choices=sorted(PAIRS), help="which named pair (default: a, the project default)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the pair's shipped directory)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args(argv)
    if args.out is not None:  # before 15 minutes of training (python -m checks it before importing torch)
        from trb_exp.config import ConfigError
        from trb_exp.preflight import check_out_dir

        try:
            check_out_dir(args.out)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    report = prepare_pair(pair_spec(args.pair), args.out or embedded_dir_of(args.pair))
    print(json.dumps({k: report[k] for k in ("key", "seconds")}))


def embedded_pair_dir(task_spec, pair: str = "a") -> Path:
    """The named embedded pair trained for ``task_spec``: the shipped one when the task is the default,
    else a pair prepared once (a few minutes, progress bar) and cached under ``~/.cache/trb_exp``."""
    spec = pair_spec(pair, task_spec)
    shipped = embedded_dir_of(pair) / "prepare.json"
    if shipped.exists() and json.loads(shipped.read_text()).get("key") == spec.key():
        return shipped.parent
    cache = Path(os.environ.get("TRB_EXP_CACHE", Path.home() / ".cache" / "trb_exp")) / f"embedded-{spec.key()}"
    if not (cache / "prepare.json").exists():
        print(f"[prepare] no embedded pair for this task yet: training one into {cache} (one time, a few minutes)")
        prepare_pair(spec, cache)
    return cache



if __name__ == "__main__":
    main()
