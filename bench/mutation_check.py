"""Mutation check: does the test suite notice when the code is wrong?

Each named mutant is a source edit (exact string replacements, each asserted to match exactly once) applied
to a fresh temporary copy of the repository (trb_exp/, conf/, tests/, pyproject.toml, README.md). A fast
selection of tests (``FAST_TESTS``) runs against the copy with ``python -m pytest -x -q -p no:cacheprovider``
and cwd = the copy, so the copy's ``trb_exp`` is imported ahead of any installed one; before the tests, a
sanity run imports the mutated module in the copy and checks that its ``__file__`` lies in the copy and
that its source holds the mutation. A mutant is *killed* when a test fails (the first failing test id is
reported); the ``unmutated`` control row must pass. Mutants run one after another with one thread.

    python bench/mutation_check.py                      # every mutant, table on stdout
    python bench/mutation_check.py --list               # the mutants and what each breaks
    python bench/mutation_check.py --only solver_beta_halved --only unmutated
    python bench/mutation_check.py --out docs/mutation_check.md

Produces docs/mutation_check.md (with --out docs/mutation_check.md).

Exit status 0 when the control passes and every mutant is killed, else 1.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ["trb_exp", "conf", "tests", "pyproject.toml", "README.md"]
FAST_TESTS = [
    "tests/test_wiring.py",
    "tests/test_evaluation.py",
    "tests/test_rollout.py",
    "tests/test_methods.py::test_skd_replaces_exactly_the_proposals_outside_the_teachers_top_k",
    "tests/test_engine.py::test_topk_teacher_stats_give_the_loss_and_gradient_of_a_teacher_pass",
    "tests/test_alignment.py",
    "tests/test_determinism.py",
    "tests/test_trainer_learns.py",
]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file, relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (old, new): old must occur exactly once
    what: str

    @property
    def module(self) -> str:
        return self.path[:-3].replace("/", ".")


MUTANTS = [
    Mutant("no_optimizer_step", "trb_exp/optim.py",
           (("    optimizer.step()\n    schedule.step()\n", "    schedule.step()\n"),),
           "(a) the accumulation step (trainer.update's) never steps the optimizer: gradients are computed, the weights never move"),
    Mutant("teacher_logprobs_shifted", "trb_exp/decode/eager.py",
           (("teacher_logprobs=torch.stack(self.t_full, 1) if self.t_full else None,",
             "teacher_logprobs=torch.stack(self.t_full[1:] + self.t_full[-1:], 1) if self.t_full else None,"),),
           "(b) the rollout's teacher log-probs shifted by one position (position t gets the teacher at t+1)"),
    Mutant("topk_forward_kl", "trb_exp/losses.py",
           (("    return _kl(_logprobs(s, dtype), _teacher_logprobs(teacher_logprobs_on_ids, dtype))",
             "    return _kl(_teacher_logprobs(teacher_logprobs_on_ids, dtype), _logprobs(s, dtype))"),),
           "(c) the top-k estimator computes the forward KL(pT_k || pS_k) instead of the reverse"),
    Mutant("solver_beta_halved", "trb_exp/blend/solver.py",
           (("    return _finalize(prep, beta_m, iters_m, kl_m, cached)",
             "    return _finalize(prep, beta_m * 0.5, iters_m)"),),
           "(d) the solver returns half its beta (mu, beta and KL recomputed there): feasible, budget unused"),
    Mutant("per_microbatch_normaliser", "trb_exp/trainer.py",
           (("return losses.masked_token_mean(per_tok, ro.response_mask[sl], n_tokens), est",
             "return losses.masked_token_mean(per_tok, ro.response_mask[sl]), est"),),
           "(e) each micro-batch normalised by its own token count instead of the step's"),
    Mutant("schedule_never_anneals", "trb_exp/schedules.py",
           (("    if step >= warmup_steps:\n        return 0.0\n    frac = step / warmup_steps\n",
             "    frac = 0.0\n"),),
           "(f) every annealing schedule stays at eps0 forever (no decay, no cut to 0 at K)"),
    Mutant("skd_never_replaces", "trb_exp/rules/skd.py",
           (("        replaced = ~(top == proposals[:, None]).any(-1)\n",
             "        replaced = torch.zeros_like(proposals, dtype=torch.bool)\n"),),
           "(g) SKD accepts every student proposal (never replaces one outside the teacher's top-K)"),
    Mutant("eos_not_merged_in_loss", "trb_exp/decode/teacher_pass.py",
           (("        self.full = None if full is None else self.merge(full)\n", "        self.full = full\n"),),
           "the batched teacher pass's log-probs reach the loss without the EOS merge"),
    Mutant("micro_batch_teacher_wrong_rows", "trb_exp/decode/teacher_pass.py",
           (("full = self.merge(teacher_logprobs(self.teacher, self.rollout, rows))",
             "full = self.merge(teacher_logprobs(self.teacher, self.rollout, slice(0, student_logits.shape[0])))"),),
           "teacher_pass=micro_batch scores every micro-batch against the first rows' teacher"),
    Mutant("zero_grad_per_micro_batch", "trb_exp/optim.py",
           (("            loss = loss_of()\n            loss.backward()\n",
             "            optimizer.zero_grad(set_to_none=True)\n            loss = loss_of()\n            loss.backward()\n"),),
           "gradients reset inside the micro-batch loop: only the last micro-batch's gradient is applied"),
    Mutant("veto_bridge_frozen", "trb_exp/objectives.py",
           (("        return ramp(step, self.b_start, 1.0, self.horizon)\n", "        return self.b_start\n"),),
           "Veto's bridge exponent stays at b_start (never anneals to the teacher)"),
    Mutant("temp_warmup_frozen", "trb_exp/methods.py",
           (("return base if self.t0 is None else ramp(step, self.t0, base, self.K)",
             "return base if self.t0 is None else self.t0"),),
           "temp_warmup's temperature stays at t0"),
    Mutant("sampled_surrogate_not_detached", "trb_exp/losses.py",
           (("    lpt, _ = _gathered_logprob(teacher_logprobs.detach(), tokens, dtype)\n    loss = (lps - lpt).detach() * lps\n",
             "    lpt, _ = _gathered_logprob(teacher_logprobs.detach(), tokens, dtype)\n    loss = (lps - lpt) * lps\n"),),
           "the sampled estimator's advantage is not detached: same value, wrong gradient"),
    Mutant("sparse_surrogate_not_detached", "trb_exp/losses.py",
           (("    lpt = _sanitize(teacher_token_logprobs.detach(), dtype).clamp(min=LOGPROB_FLOOR)\n    loss = (lps - lpt).detach() * lps\n",
             "    lpt = _sanitize(teacher_token_logprobs.detach(), dtype).clamp(min=LOGPROB_FLOOR)\n    loss = (lps - lpt) * lps\n"),),
           "the same, in the O(k) teacher-statistics path (rollout.teacher_stats=topk)"),
    Mutant("pass_at_k_biased", "trb_exp/evaluation.py",
           (("    return 1.0 - math.comb(n - c, k) / math.comb(n, k)\n", "    return 1.0 - (1 - c / n) ** k\n"),),
           "pass@k uses the biased with-replacement estimate 1 - (1 - c/n)^k"),
    Mutant("relative_budget_ignored", "trb_exp/rules/trust_region.py",
           (("return TrustRegionSampler(eps, budget=self.budget_schedule.budget, temperature=temperature)",
             "return TrustRegionSampler(eps, temperature=temperature)"),),
           "schedule.budget=relative never reaches the behaviour rule (always absolute)"),
]
CONTROL = "unmutated"


def _ignore(directory, names):
    return [n for n in names if n in ("__pycache__", ".pytest_cache", "outputs") or n.endswith(".pyc")]


def make_copy(dest: Path) -> None:
    for item in COPY:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=_ignore)
        elif src.exists():
            shutil.copy2(src, dest / item)


def apply(mutant: Mutant, dest: Path) -> None:
    f = dest / mutant.path
    text = f.read_text()
    for old, new in mutant.edits:
        n = text.count(old)
        assert n == 1, f"mutant {mutant.name}: {old!r} occurs {n} times in {mutant.path} (must be exactly once)"
        text = text.replace(old, new)
    f.write_text(text)


def env() -> dict:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"})
    e.pop("PYTHONPATH", None)
    return e


def sanity(mutant: Mutant | None, dest: Path) -> None:
    """Import the (mutated) module from the copy, the way pytest will: cwd = the copy."""
    module = mutant.module if mutant else "trb_exp.train"
    needle = mutant.edits[0][1] if mutant else ""
    code = ("import importlib, inspect, sys; m = importlib.import_module(sys.argv[1]); "
            "print(m.__file__); sys.exit(0 if sys.argv[2] in inspect.getsource(m) else 3)")
    r = subprocess.run([sys.executable, "-c", code, module, needle], cwd=dest, env=env(), capture_output=True,
                       text=True, timeout=300)
    where = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "?"
    if r.returncode != 0 or not Path(where).resolve().is_relative_to(dest.resolve()):
        raise SystemExit(f"sanity check failed for {mutant.name if mutant else CONTROL}: {module} imported from "
                         f"{where} (rc {r.returncode}); expected the mutated copy under {dest}\n{r.stderr[-2000:]}")


FAILED_RE = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.M)  # test ids may hold spaces


def run_one(mutant: Mutant | None, tests: list[str], timeout: int) -> dict:
    name = mutant.name if mutant else CONTROL
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mut_{name}_") as tmp:
        dest = Path(tmp)
        make_copy(dest)
        if mutant:
            apply(mutant, dest)
        sanity(mutant, dest)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
        try:
            r = subprocess.run(cmd, cwd=dest, env=env(), capture_output=True, text=True, timeout=timeout)
            out, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    wall = time.time() - t0
    m = FAILED_RE.search(out)
    first = m.group(1) if m else ""
    if rc == "timeout":
        status, first = "killed (timeout)", f"timeout after {timeout} s"
    elif rc == 0:
        status = "passed" if mutant is None else "SURVIVED"
    else:
        status = "killed" if mutant else "FAILED"
        if not first:
            first = f"pytest exit {rc}: " + (out.strip().splitlines() or ["?"])[-1]
    last = (out.strip().splitlines() or [""])[-1]
    return {"name": name, "status": status, "by": first, "wall": wall, "summary": last,
            "what": mutant.what if mutant else "control: the repository as it is; every selected test must pass",
            "file": mutant.path if mutant else "-"}


def table(rows: list[dict]) -> str:
    lines = ["| mutant | file | what it breaks | killed? | by (first failing test) | wall (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        killed = {"killed": "yes", "killed (timeout)": "yes (timeout)", "SURVIVED": "**NO (survived)**",
                  "passed": "n/a (passed)", "FAILED": "**control FAILED**"}[r["status"]]
        by = f"`{r['by']}`" if r["by"] else (r["summary"] if r["status"] == "passed" else "")
        lines.append(f"| `{r['name']}` | `{r['file']}` | {r['what']} | {killed} | {by} | {r['wall']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only this mutant (repeatable; '{CONTROL}' is the control row)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--out", type=Path, default=None, help="also write the table, command and wall time here")
    p.add_argument("--timeout", type=int, default=600, help="per-mutant pytest timeout in seconds")
    p.add_argument("--tests", nargs="+", default=FAST_TESTS, help="the test selection (default: FAST_TESTS)")
    p.add_argument("--append", action="store_true", help="append the table to --out as a new section")
    p.add_argument("--title", default="The fast selection", help="the heading of the --out section")
    a = p.parse_args(argv)
    names = [CONTROL] + [m.name for m in MUTANTS]
    if a.list:
        for m in MUTANTS:
            print(f"{m.name:32s} {m.path:24s} {m.what}")
        print(f"{CONTROL:32s} {'-':24s} control")
        return 0
    unknown = [n for n in a.only if n not in names]
    if unknown:
        p.error(f"--only {unknown[0]!r}: not a mutant; --list shows them")
    chosen = [n for n in names if not a.only or n in a.only]
    by_name = {m.name: m for m in MUTANTS}
    t0, load0 = time.time(), os.getloadavg()[0]
    rows = []
    for n in chosen:
        r = run_one(by_name.get(n), a.tests, a.timeout)
        rows.append(r)
        print(f"[{n}] {r['status']} {r['by']} ({r['wall']:.0f} s)", flush=True)
    total = time.time() - t0
    md = table(rows)
    print("\n" + md)
    ok = all(r["status"] in ("killed", "killed (timeout)", "passed") for r in rows)
    print(f"\n{sum(r['status'].startswith('killed') for r in rows)}/{sum(r['name'] != CONTROL for r in rows)} "
          f"mutants killed; total wall {total:.0f} s")
    if a.out:
        cmd = "python bench/mutation_check.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        a.out.parent.mkdir(parents=True, exist_ok=True)
        head = "" if a.append and a.out.exists() else (
            "# Mutation check\n\n"
            "Each mutant is a deliberate bug (an exact source edit, asserted to match once) applied to a temporary "
            "copy of the repository; the fast test selection below runs against the copy (`pytest -x -q -p "
            "no:cacheprovider`, cwd = the copy, whose `trb_exp` is imported: checked before each run). A mutant "
            "is killed when a test fails; the control row is the unmodified code and must pass.\n\n")
        section = (
            f"## {a.title}\n\n"
            f"Command: `{cmd.strip()}`\n\n"
            f"Test selection: {', '.join(f'`{t}`' for t in a.tests)}\n\n"
            f"Measured wall time: {total:.0f} s in total (one mutant at a time, one torch thread, on a shared "
            f"2-core CPU, 1-minute load average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end); "
            f"{sum(r['status'].startswith('killed') for r in rows)} of "
            f"{sum(r['name'] != CONTROL for r in rows)} mutants killed.\n\n" + md + "\n")
        if a.append and a.out.exists():
            a.out.write_text(a.out.read_text().rstrip("\n") + "\n\n" + section)
        else:
            a.out.write_text(head + section)
        print(f"wrote {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
