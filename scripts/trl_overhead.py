#!/usr/bin/env python3
"""What does TRB cost inside TRL? TRBDistillationTrainer step / plain DistillationTrainer step, during and
after the warmup, measured side by side in ONE process.

Each repeat trains a fresh copy of the embedded student twice, with the same data order, seed and settings:
once with ``TRBDistillationTrainer(trb=TRBConfig(eps0, K))`` and once with TRL's ``DistillationTrainer``,
for ``2K`` optimizer steps each; the order of the two alternates between repeats (TRB first on even
repeats). A callback takes the wall time of every optimizer step (generation, loss, backward, optimizer).
Step 0 of every run (one-time initialisation) is left out. Reported: the median step time over the
warmup steps k = 1..K-1 and over the post-warmup steps k = K..2K-1 per trainer, the ratio of the medians,
and the median [min, max] over repeats of the per-repeat ratio; for TRB also the time spent inside the
processor (teacher forwards, solver) per warmup step, and each phase's mean completion length.

    python scripts/trl_overhead.py                        # 12 repeats, K = 6, 32 prompts x 40 tokens
    python scripts/trl_overhead.py --repeats 3 --out ''   # print only

Wall-clock on a possibly shared machine: compare the two trainers of one invocation only.
Writes docs/trl_overhead.md.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
             "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}.items():
    os.environ.setdefault(k, v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--warmup-steps", type=int, default=6, help="K: the run has 2K steps")
    ap.add_argument("--eps0", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32, help="prompts per optimizer step")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "docs" / "trl_overhead.md"))
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import DistillationConfig, DistillationTrainer

    from trb_exp.data.arithmetic import ArithmeticSpec, make_splits
    from trb_exp.integrations.trl import TRBConfig, TRBDistillationTrainer
    from trb_exp.models import EMBEDDED

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(EMBEDDED / "student")
    tok.padding_side = "left"
    student0 = AutoModelForCausalLM.from_pretrained(EMBEDDED / "student")
    teacher = AutoModelForCausalLM.from_pretrained(EMBEDDED / "teacher").eval()
    K, steps = a.warmup_steps, 2 * a.warmup_steps
    train = make_splits(ArithmeticSpec())["train"].select(range(a.batch * steps)).select_columns(["prompt"])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], None

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    def run(kind):
        timer = StepTimer()
        args = DistillationConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=a.batch,
                                  max_completion_length=a.max_new_tokens, logging_steps=1, report_to=[],
                                  learning_rate=1e-4, save_strategy="no", use_cpu=True, seed=0, bf16=False,
                                  shuffle_dataset=False, disable_tqdm=True)
        kw = dict(model=copy.deepcopy(student0), teacher_model=teacher, args=args, train_dataset=train,
                  processing_class=tok, callbacks=[timer])
        proc_s = []
        if kind == "trb":
            tr = TRBDistillationTrainer(**kw, trb=TRBConfig(eps0=a.eps0, warmup_steps=K))
            collect = tr._trb_collect
            tr._trb_collect = lambda p: (proc_s.append((tr.state.global_step, p.teacher_s, p.rule_s)), collect(p))
        else:
            tr = DistillationTrainer(**kw)
        tr.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
        tr.train()
        lengths = [h["completions/mean_length"] for h in tr.state.log_history if "completions/mean_length" in h]
        assert len(timer.times) == steps == len(lengths)
        return timer.times, lengths, proc_s

    res = {"trb": [], "plain": []}
    t_all = time.perf_counter()
    for rep in range(a.repeats):
        for kind in (("trb", "plain") if rep % 2 == 0 else ("plain", "trb")):
            res[kind].append(run(kind))
        print(f"repeat {rep}: " + "  ".join(
            f"{k} warmup {statistics.median(res[k][-1][0][1:K]):.3f}s post {statistics.median(res[k][-1][0][K:]):.3f}s"
            for k in ("trb", "plain")), flush=True)
    wall = time.perf_counter() - t_all

    phases = {"warmup (k = 1..K-1)": slice(1, K), "after (k = K..2K-1)": slice(K, steps)}
    rows = []
    for name, sl in phases.items():
        med = {k: statistics.median([t for times, _, _ in res[k] for t in times[sl]]) for k in res}
        per_rep = [statistics.median(tt[sl]) / statistics.median(pt[sl])
                   for (tt, _, _), (pt, _, _) in zip(res["trb"], res["plain"])]
        length = {k: statistics.mean([x for _, ls, _ in res[k] for x in ls[sl]]) for k in res}
        rows.append((name, med["trb"], med["plain"], med["trb"] / med["plain"], statistics.median(per_rep),
                     min(per_rep), max(per_rep), length["trb"], length["plain"]))
    proc = [(t, r) for _, _, ps in res["trb"] for k, t, r in ps if 1 <= k < K]
    teacher_med = statistics.median(t for t, _ in proc)
    solver_med = statistics.median(r for _, r in proc)

    cmd = "python scripts/trl_overhead.py" + ("" if argv is None else " " + " ".join(argv))
    lines = [
        "# TRB inside TRL: step time against plain `DistillationTrainer`",
        "",
        f"`{cmd}` (written by the script). {a.repeats} repeats, each training a fresh copy of the embedded "
        f"student for 2K = {steps} steps with `TRBDistillationTrainer(trb=TRBConfig(eps0={a.eps0}, "
        f"warmup_steps={K}))` and with TRL's `DistillationTrainer`, alternating which goes first; "
        f"{a.batch} prompts x up to {a.max_new_tokens} tokens per step, {a.threads} torch thread(s), CPU. "
        "Step time: wall time of one optimizer step (generation, loss, backward, optimizer), from a callback; "
        "step 0 of each run is left out. Medians over all repeats' steps of the phase.",
        "",
        "| phase | TRB step (s) | plain step (s) | ratio of medians | per-repeat ratio, median [min, max] | "
        "mean completion length TRB / plain |",
        "|---|---|---|---|---|---|",
    ]
    for name, tm, pm, r, rm, rlo, rhi, lt, lp in rows:
        lines.append(f"| {name} | {tm:.3f} | {pm:.3f} | {r:.2f}x | {rm:.2f}x [{rlo:.2f}, {rhi:.2f}] | "
                     f"{lt:.1f} / {lp:.1f} |")
    lines += [
        "",
        f"Inside a TRB warmup step (median per step): teacher forwards in the processor {teacher_med:.3f} s, "
        f"the TRB solver {solver_med:.3f} s.",
        "",
        f"Environment: Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}, {platform.machine()} with {os.cpu_count()} CPU(s) "
        f"(shared with other jobs while measured). Whole script: {wall:.0f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
