#!/usr/bin/env python3
"""What does TRB cost inside TRL? TRBDistillationTrainer step / plain DistillationTrainer step, during and
after the warmup, measured side by side in ONE process.

Each repeat trains a fresh copy of the embedded student three times, with the same data order, seed and
settings, for ``2K`` optimizer steps each: with ``TRBDistillationTrainer(trb=TRBConfig(eps0, K))``, with TRL's
``DistillationTrainer``, and with ``TRBDistillationTrainer`` at eps = 0 from step 0 (``warmup_steps=0``: the
code every post-warmup step runs, on the same student and tokens as plain, so its losses must be identical).
The order alternates between repeats (trb, plain, eps=0 on even repeats; the reverse on odd ones). A callback takes the wall time of every optimizer step (generation, loss, backward, optimizer).
Step 0 of every run (one-time initialisation) is left out. Reported: the median step time over the
warmup steps k = 1..K-1 and over the post-warmup steps k = K..2K-1 per trainer, the ratio of the medians,
and the median [min, max] over repeats of the per-repeat ratio; for TRB also the time spent inside the
processor (teacher forwards, solver) per warmup step, and each phase's mean completion length.

    python bench/trl_overhead.py                        # 12 repeats, K = 6, 32 prompts x 40 tokens
    python bench/trl_overhead.py --repeats 3 --out ''   # print only

Wall-clock on a possibly shared machine: compare the two trainers of one invocation only.
Produces docs/trl_overhead.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
             "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}.items():
    os.environ.setdefault(k, v)


import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402

from trb_exp.data.arithmetic import ArithmeticSpec, make_splits  # noqa: E402
from trb_exp.integrations.trl import TRBConfig, TRBDistillationTrainer  # noqa: E402
from trb_exp.models import EMBEDDED  # noqa: E402

KINDS = ("trb", "plain", "off")  # off: TRB's trainer with eps = 0 from step 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--warmup-steps", type=int, default=6, help="K: the run has 2K steps")
    ap.add_argument("--eps0", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32, help="prompts per optimizer step")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "docs" / "trl_overhead.md"))
    return ap.parse_args(argv)


class StepTimer(TrainerCallback):
    """Wall time and this process's CPU time of every optimizer step."""

    def __init__(self):
        self.wall, self.cpu, self._t = [], [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kw):
        self.wall.append(time.perf_counter() - self._t[0])
        self.cpu.append(time.process_time() - self._t[1])


def load_setup(a: argparse.Namespace) -> SimpleNamespace:
    """The embedded pair, its tokenizer (left padding) and the first batch x 2K training prompts."""
    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(EMBEDDED / "student")
    tok.padding_side = "left"
    steps = 2 * a.warmup_steps
    return SimpleNamespace(
        tok=tok, K=a.warmup_steps, steps=steps,
        student0=AutoModelForCausalLM.from_pretrained(EMBEDDED / "student"),
        teacher=AutoModelForCausalLM.from_pretrained(EMBEDDED / "teacher").eval(),
        train=make_splits(ArithmeticSpec())["train"].select(range(a.batch * steps)).select_columns(["prompt"]))


def run_trainer(su: SimpleNamespace, a: argparse.Namespace, kind: str) -> dict:
    """Train a fresh copy of the student with one kind of trainer; its per-step times, lengths, losses and (TRB)
    the processor's teacher and solver time per step."""
    timer = StepTimer()
    args = DistillationConfig(output_dir=tempfile.mkdtemp(), max_steps=su.steps, per_device_train_batch_size=a.batch,
                              max_completion_length=a.max_new_tokens, logging_steps=1, report_to=[],
                              learning_rate=1e-4, save_strategy="no", use_cpu=True, seed=0, bf16=False,
                              shuffle_dataset=False, disable_tqdm=True)
    kw = dict(model=copy.deepcopy(su.student0), teacher_model=su.teacher, args=args, train_dataset=su.train,
              processing_class=su.tok, callbacks=[timer])
    proc_s = []
    if kind == "off":  # TRB's trainer with eps = 0 from step 0: what every step after the warmup runs
        tr = TRBDistillationTrainer(**kw, trb=TRBConfig(eps0=a.eps0, warmup_steps=0))
    elif kind == "trb":
        tr = TRBDistillationTrainer(**kw, trb=TRBConfig(eps0=a.eps0, warmup_steps=su.K))
        collect = tr._trb_collect
        tr._trb_collect = lambda p: (proc_s.append((tr.state.global_step, p.teacher_s, p.rule_s)), collect(p))
    else:
        tr = DistillationTrainer(**kw)
    tr.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    tr.train()
    logs = [h for h in tr.state.log_history if "completions/mean_length" in h]
    assert len(timer.wall) == su.steps == len(logs)
    return {"wall": timer.wall, "cpu": timer.cpu, "len": [h["completions/mean_length"] for h in logs],
            "longest": [h["completions/max_length"] for h in logs], "loss": [h["loss"] for h in logs],
            "proc": proc_s}


def run_repeats(su: SimpleNamespace, a: argparse.Namespace) -> SimpleNamespace:
    """Every repeat trains the three kinds, the order alternating between repeats."""
    res = {k: [] for k in KINDS}
    first = []  # which trainer ran first in each repeat
    t_all, load0 = time.perf_counter(), os.getloadavg()
    K = su.K
    for rep in range(a.repeats):
        order = ("trb", "plain", "off") if rep % 2 == 0 else ("off", "plain", "trb")
        first.append("trb" if rep % 2 == 0 else "plain")  # which of the two ran before the other
        for kind in order:
            res[kind].append(run_trainer(su, a, kind))
        print(f"repeat {rep}: " + "  ".join(
            f"{k} warmup {statistics.median(res[k][-1]['wall'][1:K]):.3f}s post "
            f"{statistics.median(res[k][-1]['wall'][K:]):.3f}s" for k in ("trb", "plain"))
              + f"  trb(eps=0) {statistics.median(res['off'][-1]['wall'][1:]):.3f}s", flush=True)
    return SimpleNamespace(res=res, first=first, wall=time.perf_counter() - t_all, load0=load0, load1=os.getloadavg())


def phase_rows(r: SimpleNamespace, clock: str, K: int, steps: int) -> list[str]:
    """TRB against plain per phase (warmup, after): medians, ratios, completion lengths."""
    res, first, out = r.res, r.first, []
    for name, sl in {"warmup (k = 1..K-1)": slice(1, K), "after (k = K..2K-1)": slice(K, steps)}.items():
        med = {k: statistics.median([t for x in res[k] for t in x[clock][sl]]) for k in ("trb", "plain")}
        per_rep = [statistics.median(t[clock][sl]) / statistics.median(p[clock][sl])
                   for t, p in zip(res["trb"], res["plain"])]
        by_first = {f: statistics.median([x for x, g in zip(per_rep, first) if g == f]) for f in ("trb", "plain")}
        length = {k: statistics.mean([x for y in res[k] for x in y["len"][sl]]) for k in ("trb", "plain")}
        longest = {k: statistics.mean([x for y in res[k] for x in y["longest"][sl]]) for k in ("trb", "plain")}
        out.append(f"| {name} | {med['trb']:.3f} | {med['plain']:.3f} | {med['trb'] / med['plain']:.2f}x | "
                   f"{statistics.median(per_rep):.2f}x [{min(per_rep):.2f}, {max(per_rep):.2f}] | "
                   f"{by_first['trb']:.2f}x / {by_first['plain']:.2f}x | "
                   f"{length['trb']:.1f} / {length['plain']:.1f} | {longest['trb']:.1f} / {longest['plain']:.1f} |")
    return out


def off_rows(res: dict, steps: int) -> list[str]:
    """TRB's trainer at eps = 0 against plain, steps 1..2K-1, per clock."""
    sl, out = slice(1, steps), []
    for clock in ("wall", "cpu"):
        med = {k: statistics.median([t for r in res[k] for t in r[clock][sl]]) for k in ("off", "plain")}
        per_rep = [statistics.median(o[clock][sl]) / statistics.median(p[clock][sl])
                   for o, p in zip(res["off"], res["plain"])]
        out.append(f"| {clock} | {med['off']:.3f} | {med['plain']:.3f} | {med['off'] / med['plain']:.2f}x | "
                   f"{statistics.median(per_rep):.2f}x [{min(per_rep):.2f}, {max(per_rep):.2f}] |")
    return out


HEAD = ("| phase | TRB step (s) | plain step (s) | ratio of medians | per-repeat ratio, median [min, max] | "
        "per-repeat median, TRB before plain / plain before TRB | mean completion length TRB / plain | "
        "longest completion of the step (= decode steps) TRB / plain |\n"
        "|---|---|---|---|---|---|---|---|")


def render(a: argparse.Namespace, su: SimpleNamespace, r: SimpleNamespace, argv) -> str:
    K, steps, res = su.K, su.steps, r.res
    same = all(o["loss"] == p["loss"] and o["len"] == p["len"] for o, p in zip(res["off"], res["plain"]))
    proc = [(t, x) for rr in res["trb"] for k, t, x in rr["proc"] if 1 <= k < K]
    warm_wall = statistics.median([t for x in res["trb"] for t in x["wall"][1:K]])
    teacher_med = statistics.median(t for t, _ in proc)
    solver_med = statistics.median(x for _, x in proc)
    cmd = "python bench/trl_overhead.py" + ("" if argv is None else " " + " ".join(argv))
    lines = [
        "# TRB inside TRL: step time against plain `DistillationTrainer`",
        "",
        f"`{cmd}` (written by the script). {a.repeats} repeats, each training a fresh copy of the embedded "
        f"student for 2K = {steps} steps with `TRBDistillationTrainer(trb=TRBConfig(eps0={a.eps0}, "
        f"warmup_steps={K}))`, with TRL's `DistillationTrainer`, and with `TRBDistillationTrainer` at eps = 0 from "
        "step 0 (below), in the order trb, plain, eps=0 on even repeats and the reverse on odd ones; "
        f"{a.batch} prompts x up to {a.max_new_tokens} tokens per step, {a.threads} torch thread(s), CPU. "
        "Step time: one optimizer step (generation, loss, backward, optimizer), from a callback; step 0 of each "
        "run is left out. Medians over all repeats' steps of the phase; the per-repeat ratio divides the two "
        "runs of one repeat.",
        "",
        "**Wall-clock time**",
        "",
        HEAD,
        *phase_rows(r, "wall", K, steps),
        "",
        "**CPU time of the process** (`time.process_time`: less sensitive to other jobs taking the cores)",
        "",
        HEAD,
        *phase_rows(r, "cpu", K, steps),
        "",
        "**Past the warmup, same student and tokens.** `TRBDistillationTrainer` with eps = 0 from step 0 "
        "(`TRBConfig(eps0, warmup_steps=0)`: what it runs on every step after the warmup) against "
        f"`DistillationTrainer`, steps 1..2K-1, same repeats. Losses and completion lengths identical in every "
        f"repeat: {'yes' if same else 'NO'}.",
        "",
        "| clock | TRB trainer, eps = 0 (s) | plain step (s) | ratio of medians | per-repeat ratio, median [min, max] |",
        "|---|---|---|---|---|",
        *off_rows(res, steps),
        "",
        f"Inside a TRB warmup step (medians per step, wall): the teacher's cached forwards in the processor "
        f"{teacher_med:.3f} s and the TRB solver {solver_med:.3f} s, of a {warm_wall:.3f} s step. After the "
        "warmup both trainers run the same code (TRL's); their students differ (trained on different rollouts), "
        "and `generate` decodes until the longest completion of the batch ends, so the two can differ there.",
        "",
        f"Environment: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}, {platform.machine()} with {os.cpu_count()} CPU(s), "
        f"shared with other jobs while measured (load average {r.load0[0]:.1f} at the start, {r.load1[0]:.1f} at the "
        f"end). Whole script: {r.wall:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    su = load_setup(a)
    text = render(a, su, run_repeats(su, a), argv)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
