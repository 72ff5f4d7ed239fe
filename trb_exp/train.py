"""The training entrypoint: ``python -m trb_exp.train method=trb schedule=linear``.

One loop, top to bottom: sample rollouts with the method's behaviour rule for step k, take the
teacher's log-probs from the rollout (or one batched teacher pass when the teacher did not run
during decoding), minimise the per-token loss normalised by the response tokens of the whole
step, log, evaluate every ``trainer.eval_every`` steps, save the student (safetensors). A method's
warm start (``sft_warmup``, ``warm_start.py``) runs once, after the initial evaluation, before step 0.
"""

from __future__ import annotations

if __name__ == "__main__":  # offline and a model that is not cached: stop before the slow imports
    from trb_exp.preflight import preflight

    preflight("config")

import functools
import json
import random
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import transformers

from trb_exp import losses
from trb_exp.blending import merge_eos
from trb_exp.config import ConfigError, validate
from trb_exp.data import Benchmark, encode_prompts, load_benchmarks, load_task, prompt_formatter
from trb_exp.evaluation import evaluate, evaluate_benchmarks
from trb_exp.logger import RunLogger
from trb_exp.methods import Method
from trb_exp.models import (check_available, check_pair, embedded_pair_dir, load_model, load_tokenizer,
                            pair_eos_ids, pick_device, set_vocab_size)
from trb_exp.rollout import (concat_rollouts, response_logits, sample, sample_kwargs, teacher_logprobs,
                             teacher_logprobs_at)
from trb_exp.warm_start import sft_warm_start


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


def rollout_metrics(ro, texts, answers, grade, method: Method, step: int, temperature: float = 1.0) -> dict:
    """Per-step diagnostics of the training rollouts, the method's knobs at this step, and those of
    its behaviour rule (TRB's blending, SKD's replacements)."""
    mask = ro.response_mask
    n_tok = mask.sum().clamp_min(1)
    lengths = mask.sum(1).float()
    m = {
        "rollout/reward": sum(grade(t, a) for t, a in zip(texts, answers)) / len(texts),
        "rollout/mean_length": lengths.mean().item(),
        "rollout/eos_rate": ro.finished.float().mean().item(),
        "rollout/decode_s": ro.decode_s,
        "rollout/decode_steps": int(ro.response_mask.shape[1]),  # loop iterations (longest response)
        **method.diagnostics(step, temperature),
    }
    if ro.token_logprobs_student is not None:
        m["rollout/student_logprob"] = (ro.token_logprobs_student * mask).sum().item() / n_tok.item()
    if ro.teacher_logprobs is None and ro.teacher_token_logprobs is not None:  # rollout.teacher_stats=topk
        m["rollout/teacher_entropy"] = (ro.teacher_entropy * mask).sum().item() / n_tok.item()
        m["rollout/teacher_logprob"] = (ro.teacher_token_logprobs * mask).sum().item() / n_tok.item()
    if ro.teacher_logprobs is not None:
        t = ro.teacher_logprobs
        ent = -(t.exp() * t.clamp_min(-1e4)).sum(-1)
        tok_lp = t.gather(-1, ro.response_ids.clamp_min(0)[..., None]).squeeze(-1)
        m["rollout/teacher_entropy"] = (ent * mask).sum().item() / n_tok.item()
        m["rollout/teacher_logprob"] = (tok_lp * mask).sum().item() / n_tok.item()
    d = ro.diagnostics
    if "replaced" in d:
        m["skd/replaced_frac"] = d["replaced"][mask].mean().item()
    if "beta" in d:
        beta, kl = d["beta"][mask], d["kl_behavior_student"][mask]
        m.update({
            "trb/eps_mean": d["eps"][mask].mean().item(),
            "trb/beta_mean": beta.mean().item(),
            "trb/frac_beta_pos": (beta > 0).float().mean().item(),
            "trb/frac_beta_one": (beta >= 1).float().mean().item(),
            "trb/kl_behavior_student_mean": kl.mean().item(),
            "trb/kl_behavior_student_max": kl.max().item(),
            "trb/kl_behavior_student_seq_sum": (d["kl_behavior_student"] * mask).sum(1).mean().item(),
            "trb/kl_excess_max": (kl - d["eps"][mask]).max().item(),
            "trb/solver_iters_mean": d["solver_iters"][mask].mean().item(),
            "trb/solver_iters_max": d["solver_iters"][mask].max().item(),
            "trb/solver_share": ro.rule_s / max(ro.decode_s, 1e-9),
        })
    elif method.rollout == "trust_region":
        m.update({"trb/beta_mean": 0.0, "trb/frac_beta_pos": 0.0, "trb/kl_behavior_student_mean": 0.0})
    return m


def run(cfg: DictConfig, run_dir: Path) -> dict:
    validate(cfg)
    transformers.utils.logging.disable_progress_bar()
    method = Method.from_cfg(cfg.method, cfg.schedule)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    tr = cfg.trainer
    mc = cfg.model
    teacher_pass = str(mc.get("teacher_pass", "rollout"))
    if teacher_pass not in ("rollout", "micro_batch"):
        raise ConfigError(f"model.teacher_pass={teacher_pass!r}: use rollout or micro_batch")
    rkw = sample_kwargs(cfg, method.topk)  # rollout.engine and its knobs, rollout.teacher_stats
    if rkw["teacher_stats"] == "auto":  # topk where the method's loss allows it (the paper presets), else full
        rkw["teacher_stats"] = "topk" if method.sparse_teacher_ok else "full"
    sparse = rkw["teacher_stats"] == "topk" and method.needs_teacher_logprobs
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
    student = load_model(mc.student, device=device, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code,
                         train=True, embedded_dir=emb, gradient_checkpointing=bool(mc.get("gradient_checkpointing")),
                         field="model.student")
    teacher_device = pick_device(mc.get("teacher_device") or str(device))
    teacher = load_model(mc.teacher, device=teacher_device, dtype=mc.dtype, trust_remote_code=mc.trust_remote_code,
                         train=False, embedded_dir=emb, field="model.teacher")
    vocab = check_pair(tok, teacher_tok, student, teacher)
    set_vocab_size(student, vocab)  # padded embeddings: compare both models on the tokenizer's vocabulary
    set_vocab_size(teacher, vocab)
    # one rendering of every prompt (chat template / plain format), encoded with the student's tokenizer
    fmt = prompt_formatter(tok, mc)
    train_prompts = [fmt(p) for p in task.train_prompts]
    if not benchmarks:
        benchmarks = [Benchmark(task.name, task.test_prompts, task.test_answers, task.grade)]
    eval_size = tr.eval_size
    benchmarks = [Benchmark(b.name, [fmt(p) for p in b.prompts[:eval_size]], b.answers[:eval_size], b.grade)
                  for b in benchmarks]
    # different EOS ids (Base student, instruct teacher): one merged end-of-sequence event at the student's id
    eos_id, eos_ids = pair_eos_ids(tok, teacher_tok, student, teacher)

    opt = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.optim.warmup_steps)))
    logger = RunLogger(run_dir, backend=cfg.logger.backend, project=cfg.logger.project,
                       name=f"{method.name}-s{cfg.seed}", mode=cfg.logger.mode,
                       config=OmegaConf.to_container(cfg, resolve=True))
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    batch_of = functools.partial(prompt_batch, int(cfg.seed), n_prompts=len(train_prompts),
                                 per_step=tr.prompts_per_step)

    def run_eval(step: int) -> dict:
        kw = dict(n_samples=tr.eval_samples, temperature=1.0, max_new_tokens=tr.max_new_tokens, seed=cfg.seed + 1,
                  eos_ids=eos_ids, batch_size=int(ev.get("batch_size") or 512))
        if len(benchmarks) == 1:  # one test set (the embedded default): eval/<metric>
            b = benchmarks[0]
            r = evaluate(student, tok, b.prompts, b.answers, b.grade, **{**kw, "n_samples": kw["n_samples"] or b.n_samples})
        else:  # eval/<benchmark>/<metric> and the setup average eval/<metric>
            r = evaluate_benchmarks(student, tok, benchmarks, **kw)
        r = {f"eval/{k}": v for k, v in r.items()}
        logger.log(r, step)
        print(f"[eval] step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
        return r

    history = [{"step": 0, **run_eval(0)}]
    t_train = time.time()
    if method.sft_updates:  # sft_warmup: SFT on teacher samples for exactly the prompts of the first N steps
        first = [i for s in range(method.sft_steps) for i in batch_of(s)]
        sft_warm_start(student, teacher, tok, [train_prompts[i] for i in first],
                       [task.train_answers[i] for i in first], task.grade, n_samples=method.sft_samples,
                       updates=method.sft_updates, cfg=cfg, logger=logger, generator=gen,
                       eos_id=eos_id, eos_ids=eos_ids)
    for step in range(tr.max_steps):
        t_step = time.time()
        # 1. prompts for this step (each repeated rollouts_per_prompt times), epoch-shuffled
        batch = [i for i in batch_of(step) for _ in range(tr.rollouts_per_prompt)]
        ids, mask = encode_prompts(tok, [train_prompts[i] for i in batch], device)

        # 2. rollouts from the method's behaviour rule at this step
        student.eval()
        rule = method.rule(step, tr.temperature, generator=gen)
        chunk = tr.get("rollout_batch_size") or len(batch)  # decode in row chunks: one chunk's KV caches at a time
        parts = [sample(student, teacher, ids[c : c + chunk], mask[c : c + chunk], rule,
                        max_new_tokens=tr.max_new_tokens, eos_id=eos_id, pad_id=tok.pad_token_id,
                        generator=gen, eos_ids=eos_ids, **rkw,
                        keep_teacher_logprobs=method.needs_teacher_logprobs and (teacher_pass == "rollout" or sparse))
                 for c in range(0, len(batch), chunk)]
        ro = parts[0] if len(parts) == 1 else concat_rollouts(parts, tok.pad_token_id)
        student.train()

        # 3. teacher statistics: reuse the rollout's, else one batched pass (teacher_pass=micro_batch:
        #    one teacher pass per micro-batch inside step 4, so [B, T, V] never exists for the whole step)
        t_lp = ro.teacher_logprobs
        if t_lp is None and method.needs_teacher_logprobs and teacher_pass == "rollout" and not sparse:
            t_lp = teacher_logprobs(teacher, ro)
        if t_lp is not None:  # one merged EOS event (idempotent; a no-op for a single EOS id)
            t_lp = merge_eos(t_lp, eos_ids, eos_id)

        # 4. loss over micro-batches, normalised by the response tokens of the whole step
        n_tokens = ro.response_mask.sum()
        opt.zero_grad(set_to_none=True)
        total, kl_est = 0.0, 0.0
        for s in range(0, len(batch), tr.micro_batch_size):
            sl = slice(s, s + tr.micro_batch_size)
            logits = response_logits(student, ro.input_ids[sl], ro.attention_mask[sl], ro.prompt_len)
            logits = merge_eos(logits, eos_ids, eos_id)  # the loss sees the merged EOS event too
            t_sl = None if t_lp is None else t_lp[sl]
            if sparse:  # rollout.teacher_stats=topk: O(k) teacher statistics, from the rollout or one gathered pass
                ids_k = ro.topk_ids[sl] if ro.topk_ids is not None else logits.detach().topk(
                    min(method.topk, logits.shape[-1]), dim=-1).indices
                t_k, t_tok = ro.teacher_topk_logprobs, ro.teacher_token_logprobs
                if t_tok is None or (t_k is None and method.estimator == "topk"):
                    both = teacher_logprobs_at(teacher, ro, torch.cat([ids_k, ro.response_ids[sl, :, None]], -1), sl,
                                               merge=lambda x: merge_eos(x, eos_ids, eos_id))
                    t_k, t_tok = both[..., :-1], both[..., -1]
                else:
                    t_k, t_tok = (None if t_k is None else t_k[sl]), t_tok[sl]
                per_tok = method.per_token_loss_sparse(logits, ids_k, t_k, ro.response_ids[sl], t_tok)
            elif t_sl is None and method.needs_teacher_logprobs:  # teacher_pass=micro_batch
                t_sl = merge_eos(teacher_logprobs(teacher, ro, sl), eos_ids, eos_id)
            if not sparse:
                per_tok = method.per_token_loss(logits, t_sl, ro.response_ids[sl], step)
            loss = losses.masked_token_mean(per_tok, ro.response_mask[sl], n_tokens)
            loss.backward()
            total += loss.item()
            if method.logs_kl_estimate:  # the sampled loss is a surrogate: log a real KL estimate
                est = (losses.sampled_kl_estimate_gathered(logits, ro.response_ids[sl], t_tok) if sparse
                       else method.kl_estimate(logits, t_sl, ro.response_ids[sl], step))
                kl_est += losses.masked_token_mean(est, ro.response_mask[sl], n_tokens).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
        opt.step()
        lr_sched.step()

        # 5. log; an adaptive budget (schedule=gap|reward) takes this step's gap and reward
        log_now = (step + 1) % tr.log_every == 0 or step == 0
        if log_now or method.schedule.adaptive:
            texts = tok.batch_decode(ro.response_ids, skip_special_tokens=True)
            m = rollout_metrics(ro, texts, [task.train_answers[i] for i in batch], task.grade, method, step,
                                tr.temperature)
            m.update({"train/loss": total, "train/grad_norm": grad_norm.item(),
                      "train/lr": lr_sched.get_last_lr()[0], "time/step_s": time.time() - t_step})
            if method.logs_kl_estimate:
                m["train/kl_estimate"] = kl_est
            if log_now:
                logger.log(m, step + 1)
            method.observe(gap=kl_est if method.logs_kl_estimate else total, reward=m["rollout/reward"])
        if (tr.eval_every and (step + 1) % tr.eval_every == 0) or step + 1 == tr.max_steps:
            history.append({"step": step + 1, **run_eval(step + 1)})

    train_s = time.time() - t_train
    if tr.save_student:
        student.save_pretrained(run_dir / "student")  # safetensors
        tok.save_pretrained(run_dir / "student")
    summary = {
        "method": method.name, "seed": int(cfg.seed), "steps": int(tr.max_steps),
        "train_s": round(train_s, 2), "initial": history[0], "final": history[-1],
        "peak_rss_mb": peak_rss_mb(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    logger.close()
    return summary


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    final = summary["final"]
    print(f"[done] {summary['method']}: pass@1 {summary['initial']['eval/pass@1']:.3f} -> "
          f"{final['eval/pass@1']:.3f} in {summary['train_s']:.0f}s; run dir {run_dir}")
    return final.get("eval/pass@1")


if __name__ == "__main__":
    main()
