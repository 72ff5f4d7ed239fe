#!/usr/bin/env python3
"""Benchmark the TRB solver (safeguarded Newton) against plain bisection on beta, on one CPU thread.

Both methods share everything except the root finder (``blending.trust_region_blend_bisection`` is the public
bisection reference): the same preprocessing / exact-case resolution, the same accurate K(b) evaluation and
the same output assembly.  Bisection runs on [0, 1] until the bracket is narrower than `tol` (the same tolerance
on beta that the Newton solver uses) and returns the feasible end.

    python bench/bench_solver.py                # prints the table, produces docs/solver_benchmark.md
    python bench/bench_solver.py --out ''       # print only
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trb_exp import blending as B  # noqa: E402

CONFIGS = [  # (V, rows): rows chosen so that every cell takes ~0.1-1 s
    (20, 20_000),
    (1_000, 2_000),
    (151_936, 12),
]
EPS = [1e-3, 1e-2, 0.1, 1.0]


def make_logits(V: int, n: int, seed: int):
    """LLM-like rows: student logits ~ N(0, 3^2) with a few boosted tokens, teacher correlated with it."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, V, generator=g) * 3.0
    top = torch.randint(0, V, (n, 4), generator=g)
    xs.scatter_add_(1, top, torch.rand(n, 4, generator=g) * 8.0)
    xt = 0.7 * xs + torch.randn(n, V, generator=g) * 2.0
    return xs.bfloat16(), xt.bfloat16()


def timed(fn, repeats: int):
    fn()  # warm-up
    best = math.inf
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


HEADER = (
    "| V | eps | rows | rows solved by iteration | Newton rows/s | Newton iters mean / max "
    "| bisection rows/s | bisection iters mean / max | speed-up | max abs(beta_N - beta_B) |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "docs" / "solver_benchmark.md"), help="markdown file ('' = none)")
    return ap.parse_args()


def bench_row(V: int, n: int, eps: float, xs, xt, args: argparse.Namespace) -> str:
    """Newton against bisection on one (vocabulary, budget) cell: one table row."""
    t_n, r_n = timed(lambda: B.trust_region_blend(xs, xt, eps, tol=args.tol), args.repeats)
    t_b, r_b = timed(lambda: B.trust_region_blend_bisection(xs, xt, eps, tol=args.tol), args.repeats)
    solved = r_n.iters > 0
    it_n = r_n.iters[solved].double()
    it_b = r_b.iters[r_b.iters > 0].double()
    assert torch.all(r_n.kl <= eps + 1e-6) and torch.all(r_b.kl <= eps + 1e-6)
    dmax = (r_n.beta - r_b.beta).abs().max().item()
    fmt = lambda it: f"{it.mean().item():.2f} / {int(it.max().item())}" if it.numel() else "- / -"  # noqa: E731
    return (
        f"| {V} | {eps:g} | {n} | {solved.float().mean().item():.0%} | {n / t_n:,.0f} | {fmt(it_n)} "
        f"| {n / t_b:,.0f} | {fmt(it_b)} | {t_b / t_n:.1f}x | {dmax:.1e} |"
    )


def render(lines: list[str], machine: str, cmd: str, elapsed: float, repeats: int) -> str:
    doc = [
        "# TRB solver benchmark",
        "",
        "Throughput of `trb_exp.blending.trust_region_blend` (safeguarded Newton on sqrt K) against plain",
        "bisection on beta to the same tolerance.  Both share preprocessing (log-softmax, exact cases),",
        "the K(b) evaluation and output assembly, so rows/s are end-to-end per call.  Iteration counts are",
        "over the rows that needed the root finder (the others are exact cases: beta = 0 or 1).",
        "Each cell is the best of "
        f"{repeats} timed runs after a warm-up.  The machine is shared, so rows/s are indicative only;",
        "iteration counts are deterministic.",
        "",
        machine,
        "",
        f"Command: `{cmd}` (from the repository root; total runtime {elapsed:.0f} s).",
        "",
        *lines,
        "",
        "Rows are LLM-like: student logits N(0, 9) plus four boosted tokens, teacher = 0.7 * student + N(0, 4),",
        "both cast to bf16.  A Newton step costs ~1.2x a bisection step (it also needs Var_mu[d]); Newton",
        "returns log mu from its last evaluation, bisection re-evaluates once at the end.  Both pay the same",
        "fixed per-call cost (two log-softmaxes, support bookkeeping and the K(1) evaluation that decides the",
        "exact cases, together ~2-3 evaluations), which is why the end-to-end speed-up is below the ratio of",
        "iteration counts (~5-9x).",
        "",
    ]
    return "\n".join(doc)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    lines = [HEADER]
    print(HEADER, flush=True)
    t_start = time.perf_counter()
    for V, n in CONFIGS:
        xs, xt = make_logits(V, n, seed=V)
        for eps in EPS:
            lines.append(bench_row(V, n, eps, xs, xt, args))
            print(lines[-1], flush=True)
    elapsed = time.perf_counter() - t_start
    cmd = "python bench/bench_solver.py" + ("" if args.tol == 1e-6 else f" --tol {args.tol:g}")
    machine = (
        f"Machine: {os.cpu_count()}-core CPU ({cpu_name()}), torch {torch.__version__}, "
        f"torch.set_num_threads(1); float32 compute, bf16 inputs, tol = {args.tol:g}."
    )
    print(f"\n{machine}\nTotal benchmark time {elapsed:.0f} s.")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(render(lines, machine, cmd, elapsed, args.repeats))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
