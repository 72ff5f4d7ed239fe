"""Evaluation: sampled pass@1 (the paper's metric), unbiased pass@k, greedy accuracy.

pass@1 is the mean over problems of c/n, with n samples per problem at temperature 1 drawn by
the same decode loop the trainer uses (``StudentSampler``); ``pass@1_se`` is its standard error from
that sampling alone (the evaluation noise of a fixed model, unbiased per-problem variances). Graders are plain functions
``grade(response_text, reference) -> bool``.
"""

from __future__ import annotations

import math

import torch

from trb_exp.data import encode_prompts
from trb_exp.decode.backend import sample
from trb_exp.decode.config import RolloutConfig
from trb_exp.rules import GreedySampler, StudentSampler


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_1_se(correct_per_problem: list[int], n: int) -> float:
    """Standard error of pass@1 = mean_i c_i/n from the sampling alone (the model held fixed):
    sqrt(sum_i s_i^2 / n) / N with the unbiased per-problem variance s_i^2 = c_i (n - c_i) / (n (n - 1))."""
    if n < 2:
        raise ValueError(f"pass_at_1_se needs n >= 2 samples per problem, got n={n}")
    var = sum(c * (n - c) / (n * (n - 1)) for c in correct_per_problem) / n
    return math.sqrt(var) / len(correct_per_problem)


def _generate(model, tokenizer, prompts, rule, *, max_new_tokens, batch_size, generator, device, eos_ids=(),
              progress: str | None = None, rollout: RolloutConfig | None = None):
    texts, lengths, finished = [], [], []
    starts = range(0, len(prompts), batch_size)
    if progress:  # the evaluation's own bar (one tick per decoded batch), gone when it is done
        from tqdm import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False, dynamic_ncols=True)
    for i in starts:
        ids, mask = encode_prompts(tokenizer, prompts[i : i + batch_size], device)
        ro = sample(model, None, ids, mask, rule, max_new_tokens=max_new_tokens,
                    eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, generator=generator,
                    eos_ids=eos_ids, config=rollout)
        texts += tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
        lengths += ro.response_mask.sum(1).tolist()
        finished += ro.finished.tolist()
    return texts, lengths, finished


@torch.no_grad()
def evaluate(model, tokenizer, prompts: list[str], answers: list[str], grade, *, n_samples: int = 4,
             temperature: float = 1.0, greedy: bool = True, max_new_tokens: int = 64,
             batch_size: int = 512, seed: int = 0, ks: tuple[int, ...] = (1,),
             eos_ids: tuple[int, ...] = (), progress: bool | str = False,
             rollout: RolloutConfig | None = None) -> dict[str, float]:
    """Sampled pass@1 (+ pass@k for k in ``ks`` up to n) and greedy accuracy on ``prompts``.

    ``eos_ids``: extra end-of-sequence ids (the teacher's) merged into the tokenizer's EOS, as in training.
    ``progress``: show a progress bar over the decoded batches (a string: its label). ``rollout``: the decode
    engine and its knobs (default the eager loop)."""
    label = (progress if isinstance(progress, str) else "eval") if progress else None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    rep_prompts = [p for p in prompts for _ in range(n_samples)]
    texts, lengths, finished = _generate(model, tokenizer, rep_prompts, StudentSampler(temperature),
                                         max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         generator=gen, device=device, eos_ids=eos_ids, progress=label,
                                         rollout=rollout)
    correct = [grade(t, answers[i // n_samples]) for i, t in enumerate(texts)]
    per_problem = [sum(correct[j * n_samples : (j + 1) * n_samples]) for j in range(len(prompts))]
    out = {
        "pass@1": sum(c / n_samples for c in per_problem) / len(prompts),
        "mean_length": sum(lengths) / len(lengths),
        "eos_rate": sum(finished) / len(finished),
    }
    if n_samples > 1:
        out["pass@1_se"] = pass_at_1_se(per_problem, n_samples)
    for k in ks:
        if 1 < k <= n_samples:
            out[f"pass@{k}"] = sum(pass_at_k(n_samples, c, k) for c in per_problem) / len(prompts)
    if greedy:
        gtexts, _, _ = _generate(model, tokenizer, list(prompts), GreedySampler(), max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, generator=gen, device=device, eos_ids=eos_ids,
                                 progress=label and f"{label} (greedy)", rollout=rollout)
        out["greedy_acc"] = sum(grade(t, a) for t, a in zip(gtexts, answers)) / len(prompts)
    model.train(was_training)
    return out


def default_ks(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to n, and n itself: the pass@k reported for n samples per problem."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return tuple(dict.fromkeys([*ks, n]))


def evaluate_benchmarks(model, tokenizer, benchmarks, *, n_samples: int | None = None,
                        ks: tuple[int, ...] | None = None, progress: bool = False, evaluate_fn=None,
                        **kw) -> dict[str, float]:
    """``evaluate`` on each benchmark (``data.Benchmark``) with ``n_samples`` per problem (None: each
    benchmark's own n, the paper's count), as ``<name>/<metric>``; plus the setup average of every
    metric that every benchmark reports (unweighted, as the paper's Table 1 averages its
    columns), as ``<metric>``. ``evaluate_fn`` replaces ``evaluate`` (``distributed.sharded_evaluate``)."""
    evaluate_fn = evaluate_fn or evaluate
    out: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    for b in benchmarks:
        n = int(n_samples or b.n_samples)
        r = evaluate_fn(model, tokenizer, b.prompts, b.answers, b.grade, n_samples=n,
                        ks=ks if ks is not None else default_ks(n), progress=progress and f"eval {b.name}", **kw)
        r["n_samples"], r["n_problems"] = n, len(b.prompts)
        for k, v in r.items():
            out[f"{b.name}/{k}"] = v
            if k not in ("n_samples", "n_problems"):
                per.setdefault(k, []).append(v)
    out.update({k: sum(v) / len(v) for k, v in per.items() if len(v) == len(benchmarks)})
    if "pass@1_se" in out:  # the standard error of the average of independent estimates, not their mean
        out["pass@1_se"] = math.sqrt(sum(x * x for x in per["pass@1_se"])) / len(benchmarks)
    return out
