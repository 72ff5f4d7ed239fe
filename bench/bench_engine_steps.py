#!/usr/bin/env python3
"""Paired, in-process engine benchmark: OPD steps and TRB warmup steps, eager vs static
engine, on the embedded default, alternating at the level of single training steps.

On a shared machine the load changes from second to second, so whole runs compared one after the other
differ by more than the effect measured. Here the four configurations (OPD eager, OPD static, TRB eager,
TRB static) each get their own copy of the student, optimizer and generator, and advance one training step
each in turn, in a rotating order, for ``--steps`` rounds: step k of every configuration ran within the
same few seconds. The step is the trainer's (same functions, same order as ``train.py``): the rollout
(``decode.backend.sample`` with the method's rule), the teacher statistics (from the rollout, else one batched
teacher pass), the micro-batch loss and backward, clip, AdamW. Reported: medians of the step time and of
``decode_s`` per configuration, and the medians of the per-round paired ratios.

    python bench/bench_engine_steps.py --steps 60 --out docs/engine_cpu_steps.md

Produces docs/engine_cpu_steps.md (and its .json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trb_exp import losses  # noqa: E402
from trb_exp.data import encode_prompts, load_task, prompt_formatter  # noqa: E402
from trb_exp.methods import Method  # noqa: E402
from trb_exp.models import load_model, load_tokenizer  # noqa: E402
from trb_exp.prepare import embedded_pair_dir  # noqa: E402
from trb_exp.decode.backend import sample  # noqa: E402
from trb_exp.decode.forward import response_logits  # noqa: E402
from trb_exp.decode.teacher_pass import teacher_logprobs  # noqa: E402
from trb_exp.trainer import prompt_batch  # noqa: E402

CONFIGS = [("opd", "eager"), ("opd", "static"), ("trb", "eager"), ("trb", "static")]
METRICS = ("step_s", "decode_s", "rule_s", "student_fwd_s", "teacher_fwd_s")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out (allocation, warm caches)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def load_setup() -> SimpleNamespace:
    """The embedded default's config, pair, tokenizer and training prompts, and the OPD and TRB methods (every
    TRB step a warmup step)."""
    cfg = compose_cfg(["logger=none"])
    task = load_task(cfg.dataset)
    emb = embedded_pair_dir(task.spec, "a")
    tok = load_tokenizer(cfg.model.student, embedded_dir=emb)
    cpu = torch.device("cpu")
    fmt = prompt_formatter(tok, cfg.model)
    methods = {}
    for m in ("opd", "trb"):
        c = compose_cfg([f"method={m}", "schedule.eps0=0.5", "schedule.warmup_steps=100000"])
        methods[m] = Method.from_cfg(c.method, c.schedule)
    return SimpleNamespace(
        cfg=cfg, tok=tok, cpu=cpu, methods=methods, prompts=[fmt(p) for p in task.train_prompts],
        base=load_model(cfg.model.student, device=cpu, train=True, embedded_dir=emb),
        teacher=load_model(cfg.model.teacher, device=cpu, train=False, embedded_dir=emb))


def time_forwards(teacher) -> dict[str, float]:
    """Wrap ``StaticLM.prefill`` / ``decode`` so that the static engine's time inside each model's forward is
    added up by role (a perf_counter pair per call, ~1 us): where the TRB decode goes. Returns the counters."""
    from trb_exp.decode.static_lm import StaticLM

    fwd_s = {"student": 0.0, "teacher": 0.0}

    def timed(f):
        def g(lm, *args, **kw):
            t0 = time.perf_counter()
            out = f(lm, *args, **kw)
            fwd_s["teacher" if lm.inner is teacher.model else "student"] += time.perf_counter() - t0
            return out
        return g

    StaticLM.prefill, StaticLM.decode = timed(StaticLM.prefill), timed(StaticLM.decode)
    return fwd_s


def new_states(su: SimpleNamespace) -> dict:
    """Per configuration: its own student copy, AdamW and generator, and its lists of per-step timings."""
    state = {}
    for key in CONFIGS:
        s = copy.deepcopy(su.base)
        state[key] = dict(student=s, gen=torch.Generator().manual_seed(0),
                          opt=torch.optim.AdamW(s.parameters(), lr=su.cfg.optim.lr, betas=tuple(su.cfg.optim.betas),
                                                weight_decay=su.cfg.optim.weight_decay),
                          **{m: [] for m in METRICS})
    return state


def one_step(su: SimpleNamespace, st: dict, key, step: int, fwd_s: dict) -> None:
    """One training step of configuration ``key`` (the trainer's functions in the trainer's order), timed."""
    method, engine = su.methods[key[0]], key[1]
    student, opt, tok, tr = st["student"], st["opt"], su.tok, su.cfg.trainer
    fwd_s.update(student=0.0, teacher=0.0)
    t0 = time.perf_counter()
    batch = [i for i in prompt_batch(0, step, len(su.prompts), tr.prompts_per_step) for _ in range(tr.rollouts_per_prompt)]
    ids, mask = encode_prompts(tok, [su.prompts[i] for i in batch], su.cpu)
    student.eval()
    ro = sample(student, su.teacher, ids, mask, method.sampler(step, tr.temperature, generator=st["gen"]),
                max_new_tokens=tr.max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                generator=st["gen"], keep_teacher_logprobs=True, engine=engine)
    student.train()
    t_lp = ro.teacher_logprobs if ro.teacher_logprobs is not None else teacher_logprobs(su.teacher, ro)
    n_tokens = ro.response_mask.sum()
    opt.zero_grad(set_to_none=True)
    for s0 in range(0, len(batch), tr.micro_batch_size):
        sl = slice(s0, s0 + tr.micro_batch_size)
        logits = response_logits(student, ro.input_ids[sl], ro.attention_mask[sl], ro.prompt_len)
        per_tok = method.per_token_loss(logits, t_lp[sl], ro.response_ids[sl], step)
        losses.masked_token_mean(per_tok, ro.response_mask[sl], n_tokens).backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), su.cfg.optim.grad_clip)
    opt.step()
    # what train.py's logging reads back (texts for the reward, a few .item()s)
    tok.batch_decode(ro.response_ids, skip_special_tokens=True)
    st["step_s"].append(time.perf_counter() - t0)
    st["decode_s"].append(ro.decode_s)
    st["rule_s"].append(ro.rule_s)
    st["student_fwd_s"].append(fwd_s["student"])
    st["teacher_fwd_s"].append(fwd_s["teacher"])


def run_rounds(su: SimpleNamespace, state: dict, fwd_s: dict, steps: int) -> list[float]:
    """``steps`` rounds, each advancing every configuration by one step in a rotating order; returns the
    1-minute load averages read every 10 rounds."""
    load = []
    for step in range(steps):
        order = CONFIGS[step % 4:] + CONFIGS[: step % 4]
        for key in order:
            one_step(su, state[key], key, step, fwd_s)
        if step % 10 == 0:
            load.append(os.getloadavg()[0])
            print(f"step {step}: " + "  ".join(f"{k[0]}/{k[1]} {state[k]['step_s'][-1]:.3f}" for k in CONFIGS), flush=True)
    return load


def summarise(state: dict, sk: int) -> tuple[dict, dict]:
    """Medians per configuration and the medians of the paired per-round ratios."""
    med = {k: {m: statistics.median(state[k][m][sk:]) for m in METRICS} for k in CONFIGS}

    def paired(a_, b_, m):
        return statistics.median(x / y for x, y in zip(state[a_][m][sk:], state[b_][m][sk:]))

    res = {
        "median": {f"{k[0]}/{k[1]}": v for k, v in med.items()},
        "opd_decode_static_over_eager": paired(("opd", "static"), ("opd", "eager"), "decode_s"),
        "trb_decode_static_over_eager": paired(("trb", "static"), ("trb", "eager"), "decode_s"),
        "trb_over_opd_step": {e: paired(("trb", e), ("opd", e), "step_s") for e in ("eager", "static")},
    }
    return med, res


def render(med: dict, res: dict, a: argparse.Namespace, load: list[float]) -> str:
    f3 = "{:.3f}".format
    sk, n = a.skip, a.steps - a.skip
    lines = [
        "# rollout.engine on CPU: paired training steps (embedded default)",
        "",
        f"Generated by `bench/bench_engine_steps.py --steps {a.steps}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, torch threads = 1; a shared machine: 1-minute load average "
        f"{min(load):.1f}–{max(load):.1f} during the run). Wall time {res['wall_s']:.0f} s.",
        "",
        "Four configurations, each with its own student copy, optimizer and generator, one training step each in "
        "turn (rotating order), so step k of all four ran within seconds of each other; 64 rollouts per step "
        "(32 prompts × 2), `trainer.max_new_tokens=40`, TRB with `schedule.eps0=0.5` (every step a warmup step), "
        f"loss top-16 reverse KL; medians over steps {sk}–{a.steps - 1} (n = {n}).",
        "",
        "| method | engine | step s | decode s | of which rule (solver) s | rest of the step s |",
        "|---|---|---|---|---|---|",
    ]
    for k in CONFIGS:
        lines.append(f"| {k[0]} | {k[1]} | {f3(med[k]['step_s'])} | {f3(med[k]['decode_s'])} | {f3(med[k]['rule_s'])} | "
                     f"{f3(med[k]['step_s'] - med[k]['decode_s'])} |")
    lines += [
        "",
        f"- OPD decode time, static / eager (median of paired ratios): **{res['opd_decode_static_over_eager']:.2f}**, "
        f"i.e. {100 * (1 - res['opd_decode_static_over_eager']):.0f}% lower (goal: at least 40% lower).",
        f"- TRB decode time, static / eager: **{res['trb_decode_static_over_eager']:.2f}**.",
        f"- TRB warmup step / OPD step (paired): eager **{res['trb_over_opd_step']['eager']:.2f}**, static "
        f"**{res['trb_over_opd_step']['static']:.2f}** (goal: <= 1.4 with the new engine).",
    ]
    return "\n".join(lines + render_parts(med["trb", "static"], med["opd", "static"])) + "\n"


def render_parts(ts: dict, os_: dict) -> list[str]:
    """Where the static engine's decode time goes, and the TRB - OPD step difference by part."""
    f3 = "{:.3f}".format
    rest_t = ts["decode_s"] - ts["teacher_fwd_s"] - ts["student_fwd_s"] - ts["rule_s"]
    rest_o = os_["decode_s"] - os_["student_fwd_s"] - os_["rule_s"]
    return [
        "",
        "Where the static engine's decode time goes (medians, s; model forward = prefill + decode steps, timed "
        "around `StaticLM.prefill` / `StaticLM.decode`; the rest = sampling, the rule's other work, the "
        "records, compaction):",
        "",
        "| method | student forward | teacher forward | rule (solver) | rest of the decode | decode |",
        "|---|---|---|---|---|---|",
        f"| opd | {f3(os_['student_fwd_s'])} | – | {f3(os_['rule_s'])} | {f3(rest_o)} | {f3(os_['decode_s'])} |",
        f"| trb | {f3(ts['student_fwd_s'])} | {f3(ts['teacher_fwd_s'])} | {f3(ts['rule_s'])} | {f3(rest_t)} | "
        f"{f3(ts['decode_s'])} |",
        "",
        f"TRB step − OPD step (static, medians): {f3(ts['step_s'] - os_['step_s'])} s = teacher forward "
        f"{f3(ts['teacher_fwd_s'])} + solver {f3(ts['rule_s'])} + the other decode differences "
        f"{f3(ts['decode_s'] - ts['teacher_fwd_s'] - ts['rule_s'] - os_['decode_s'])} + the rest of the step "
        f"{f3((ts['step_s'] - ts['decode_s']) - (os_['step_s'] - os_['decode_s']))} (OPD's rest holds a batched "
        "teacher pass that TRB reuses from its rollout).",
    ]


def main(argv=None) -> dict:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    su = load_setup()
    fwd_s = time_forwards(su.teacher)
    state = new_states(su)
    t_all = time.time()
    load = run_rounds(su, state, fwd_s, a.steps)
    med, res = summarise(state, a.skip)
    res.update(load_1min=load, steps=a.steps, skip=a.skip, wall_s=time.time() - t_all)
    md = render(med, res, a, load)
    print(md)
    if a.out:
        Path(a.out).write_text(md)
        Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
