"""The training loop, top to bottom (the CLI around it is ``trb_exp/train.py``).

``run(cfg, run_dir)`` builds the experiment once (``experiment.setup``: the pair, prompts, benchmarks,
method), keeps everything a step changes in a ``state.TrainState`` (restored from the newest
checkpoint when the run dir holds one, ``resume.py``), evaluates at step 0, runs the method's warm start
(``sft_warmup``), then ``train``: per step k, ``rollouts`` (the method's behaviour rule for step k),
``update`` (the per-token loss normalised by the response tokens of the whole step, one AdamW
step), log, evaluate every ``trainer.eval_every`` steps, checkpoint every
``trainer.checkpoint_every`` steps; SIGTERM/SIGUSR1/SIGINT stop it after the step with a checkpoint
(``preempt.py``). Under ``torchrun`` every rank runs the same loop on its share of the prompts
(``distributed.py``); rank 0 alone checks and writes the run directory.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from trb_exp import losses
from trb_exp.config import ConfigError, validate
from trb_exp.data import encode_prompts, prompt_batch
from trb_exp.decode.backend import sample
from trb_exp.decode.config import RolloutConfig
from trb_exp.decode.forward import response_logits
from trb_exp.decode.record import concat_rollouts
from trb_exp.decode.vllm import close_rollouts, vllm_rollouts
from trb_exp.decode.teacher_pass import TeacherTargets
from trb_exp.distributed import (
    DistContext,
    check_strategy,
    full_params,
    full_state_dict,
    is_fsdp,
    rank_seed,
    sharded_evaluate,
    wrap_student,
)
from trb_exp.evaluation import evaluate, evaluate_benchmarks
from trb_exp.experiment import Experiment, setup
from trb_exp.logger import NullLogger, RunLogger
from trb_exp.methods import Method
from trb_exp.optim import accumulate_step
from trb_exp.run.preempt import Stopped, StopSignals
from trb_exp.run.environment import current_environment
from trb_exp.run.resume import restore, resume_from
from trb_exp.run.state import (
    TrainState,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    save_consolidated,
    save_sharded_checkpoint,
)
from trb_exp.warm_start import sft_warm_start


def rollout_metrics(ro, texts, answers, grade, method: Method, step: int, temperature: float = 1.0) -> dict:
    """Per-step diagnostics of the training rollouts, the method's knobs at this step, and its behaviour
    rule's summary of its per-token diagnostics (``Rule.summarize``: TRB's blending, SKD's replacements)."""
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
    m.update(method.summarize(ro))  # the behaviour rule's own metrics (trb/*, skd/*)
    return m


# --------------------------------------------------------------------------- one step, in parts
def rollouts(exp: Experiment, state: TrainState, step: int):
    """The rollouts of step ``step``: its prompts (each repeated rollouts_per_prompt times) sampled
    with the method's behaviour rule at this step (under torchrun: this rank's contiguous share of the
    step's prompts). Returns (rollout, prompt indices)."""
    tr, tok = exp.cfg.trainer, exp.tok
    prompts = exp.dist.shard(prompt_batch(int(exp.cfg.seed), step, len(exp.train_prompts), tr.prompts_per_step))
    batch = [i for i in prompts for _ in range(tr.rollouts_per_prompt)]  # this rank's share of the step
    ids, mask = encode_prompts(tok, [exp.train_prompts[i] for i in batch], exp.device)
    exp.student.eval()
    rule = exp.method.sampler(step, tr.temperature, generator=state.generator)
    chunk = tr.get("rollout_batch_size") or len(batch)  # decode in row chunks: one chunk's KV caches at a time
    if exp.rollout.engine == "vllm":  # a paged engine: the whole step at once; the pair engine goes once no teacher
        chunk = len(batch)
        vllm_rollouts().plan(rule)
    keep = exp.rollout.keeps_teacher(exp.method.needs_teacher_logprobs)
    parts = [sample(exp.student, exp.teacher, ids[c : c + chunk], mask[c : c + chunk], rule,
                    max_new_tokens=tr.max_new_tokens, eos_id=exp.eos_id, pad_id=tok.pad_token_id,
                    generator=state.generator, eos_ids=exp.eos_ids, keep_teacher_logprobs=keep, config=exp.rollout)
             for c in range(0, len(batch), chunk)]
    exp.student.train()
    return (parts[0] if len(parts) == 1 else concat_rollouts(parts, tok.pad_token_id)), batch


def update(exp: Experiment, state: TrainState, ro, step: int) -> dict:
    """One optimizer step on the rollouts: the loss over micro-batches, normalised by the response
    tokens of the whole step. Each micro-batch's teacher targets come from ``TeacherTargets`` (from the
    rollout, one batched pass, or one pass per micro-batch: ``decode/teacher_pass.py``)."""
    tr, method = exp.cfg.trainer, exp.method
    targets = TeacherTargets(exp.teacher, ro, exp.rollout, needs_teacher=method.needs_teacher_logprobs,
                             estimator=method.estimator, topk=method.topk, eos_ids=exp.eos_ids, eos_id=exp.eos_id)
    n_tokens, dist, model = ro.response_mask.sum(), exp.dist, exp.train_student or exp.student
    if dist.active:  # the step's tokens on every rank, over the ranks DDP averages gradients across
        n_tokens = dist.all_sum(n_tokens) / dist.world
    kl_sum = [0.0]

    def micro_batch(sl: slice):
        def loss_of():
            loss, est = _micro_batch_loss(method, model, ro, targets, sl, n_tokens, step)
            if est is not None:  # the sampled loss is a surrogate: log a real KL estimate
                kl_sum[0] += losses.masked_token_mean(est, ro.response_mask[sl], n_tokens).item()
            return loss
        return loss_of

    rows, mb = ro.input_ids.shape[0], tr.micro_batch_size
    total, grad_norm = accumulate_step(model, state.optimizer, state.lr_schedule,
                                       [micro_batch(slice(s, s + mb)) for s in range(0, rows, mb)],
                                       grad_clip=exp.cfg.optim.grad_clip)
    kl_est = kl_sum[0]
    if dist.active:  # each rank's share of the token mean (over N/W): the step's mean over all ranks
        total, kl_est = dist.all_sum(total) / dist.world, dist.all_sum(kl_est) / dist.world
    out = {"train/loss": total, "train/grad_norm": grad_norm.item(), "train/lr": state.lr_schedule.get_last_lr()[0]}
    if method.logs_kl_estimate:
        out["train/kl_estimate"] = kl_est
    return out


def _micro_batch_loss(method: Method, model, ro, targets: TeacherTargets, sl: slice, n_tokens, step: int):
    """The loss of micro-batch ``sl`` (its share of the step's token mean) and, for the sampled estimator,
    the per-token KL estimate ``log pS(y) - log q(y)`` that is logged in its place (else None)."""
    logits = targets.merge(response_logits(model, ro.input_ids[sl], ro.attention_mask[sl], ro.prompt_len))
    tg, tokens = targets.for_micro_batch(sl, logits), ro.response_ids[sl]
    if tg.sparse:  # rollout.teacher_stats=topk: O(k) teacher statistics
        per_tok = method.per_token_loss_sparse(logits, tg.topk_ids, tg.topk_logprobs, tokens, tg.token_logprobs)
        est = (losses.sampled_kl_estimate_gathered(logits, tokens, tg.token_logprobs) if method.logs_kl_estimate
               else None)
    else:
        per_tok = method.per_token_loss(logits, tg.full, tokens, step)
        est = method.kl_estimate(logits, tg.full, tokens, step) if method.logs_kl_estimate else None
    return losses.masked_token_mean(per_tok, ro.response_mask[sl], n_tokens), est


def evaluate_student(exp: Experiment, step: int, logger: RunLogger, progress: bool = False) -> dict:
    """Score the student on the benchmarks (its own seeded generator: no training stream is touched), then
    on the validation split if the task has one (``val/<metric>``, another seeded generator).
    Under torchrun every rank scores its block of each benchmark's problems, gathered into one result."""
    tr, ev = exp.cfg.trainer, exp.cfg.get("eval") or {}
    kw = dict(n_samples=tr.eval_samples, temperature=1.0, max_new_tokens=tr.max_new_tokens, seed=exp.cfg.seed + 1,
              eos_ids=exp.eos_ids, batch_size=int(ev.get("batch_size") or 512),
              progress=progress and exp.dist.is_main, rollout=exp.rollout.student_only())
    scorer = sharded_evaluate(exp.dist, evaluate)
    if len(exp.benchmarks) == 1:  # one test set (the embedded default): eval/<metric>
        b = exp.benchmarks[0]
        r = scorer(exp.student, exp.tok, b.prompts, b.answers, b.grade,
                   **{**kw, "n_samples": kw["n_samples"] or b.n_samples})
    else:  # eval/<benchmark>/<metric> and the setup average eval/<metric>
        r = evaluate_benchmarks(exp.student, exp.tok, exp.benchmarks, evaluate_fn=scorer, **kw)
    r = {f"eval/{k}": v for k, v in r.items()}
    if exp.validation is not None:  # after the test set, its own generator: the test values are unchanged
        v = exp.validation
        r.update({f"val/{k}": x for k, x in scorer(exp.student, exp.tok, v.prompts, v.answers, v.grade, **{
            **kw, "n_samples": kw["n_samples"] or v.n_samples, "seed": exp.cfg.seed + 2}).items()})
    logger.log(r, step)
    if exp.dist.is_main:
        tqdm.write(f"[eval] step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in r.items()))
    sys.stdout.flush()
    return {"step": step, **r}


def warm_start(exp: Experiment, state: TrainState, logger: RunLogger) -> None:
    """sft_warmup: SFT on teacher samples for exactly the prompts of the first N steps, before step 0."""
    m, cfg = exp.method, exp.cfg
    first = [i for s in range(m.sft_steps)
             for i in prompt_batch(int(cfg.seed), s, len(exp.train_prompts), cfg.trainer.prompts_per_step)]
    sft_warm_start(exp.student, exp.teacher, exp.tok, [exp.train_prompts[i] for i in first],
                   [exp.train_answers[i] for i in first], exp.grade, n_samples=m.sft_samples,
                   updates=m.sft_updates, cfg=cfg, logger=logger, generator=state.generator,
                   eos_id=exp.eos_id, eos_ids=exp.eos_ids, dist=exp.dist, model=exp.train_student or exp.student)


def checkpoint(exp: Experiment, state: TrainState, run_dir: Path) -> Path:
    """Every rank takes part (its sampling stream is saved too); rank 0 writes the checkpoint. FSDP2: every
    rank writes its shards of the student and optimizer (``torch.distributed.checkpoint``) into the one
    temporary directory that rank 0 renames into place (``state.save_sharded_checkpoint``)."""
    tr, dist = exp.cfg.trainer, exp.dist
    root = run_dir / "checkpoints"
    meta = {"config": OmegaConf.to_container(exp.cfg, resolve=True)}
    if dist.active:
        meta["rng_ranks"] = dist.gather(rng_state(state.generator))
    path = root / f"step_{state.step}"
    if is_fsdp(exp.train_student or exp.student):
        path = save_sharded_checkpoint(state, exp.train_student, root, dist, meta)
        if dist.is_main:
            prune_checkpoints(root, tr.get("keep_checkpoints"))
    elif dist.is_main:
        path = save_checkpoint(state, root, exp.tok, meta)
        prune_checkpoints(root, tr.get("keep_checkpoints"))
    dist.barrier()
    return path


# --------------------------------------------------------------------------- the loop
def train(exp: Experiment, state: TrainState, logger: RunLogger, run_dir: Path, stop: StopSignals | None = None) -> None:
    """Steps ``state.step`` .. ``max_steps - 1``; raises ``Stopped`` after checkpointing on a signal."""
    tr = exp.cfg.trainer
    every = int(tr.get("checkpoint_every") or 0)
    bar = tqdm(total=tr.max_steps, initial=state.step, desc=exp.method.name, unit="step", dynamic_ncols=True,
               disable=not (tr.get("progress", True) and exp.dist.is_main),
               mininterval=0.5 if sys.stderr.isatty() else 30)
    with bar:
        for step in range(state.step, tr.max_steps):
            if _stop_requested(exp, stop):  # a signal during setup, the initial evaluation or the warm start
                raise Stopped(_signame(stop), checkpoint(exp, state, run_dir))
            t_step = time.time()
            with full_params(exp.student):  # FSDP2: ranks decode different numbers of tokens
                ro, batch = rollouts(exp, state, step)
            m = update(exp, state, ro, step)
            m.update(after_update(exp))
            state.step = step + 1
            log_now = state.step % tr.log_every == 0 or step == 0
            if log_now or exp.method.schedule.adaptive:  # an adaptive budget reads every step's gap and reward
                texts = exp.tok.batch_decode(ro.response_ids, skip_special_tokens=True)
                m = exp.dist.reduce_metrics({**rollout_metrics(ro, texts, [exp.train_answers[i] for i in batch],
                                                               exp.grade, exp.method, step, tr.temperature),
                                             **m, "time/step_s": time.time() - t_step})
                if "train/kl_estimate" in m:  # its place in the record: last
                    m["train/kl_estimate"] = m.pop("train/kl_estimate")
                if log_now:
                    logger.log(m, state.step)
                    bar.set_postfix_str(progress_line(m), refresh=False)
                exp.method.observe(gap=m["train/kl_estimate" if exp.method.logs_kl_estimate else "train/loss"],
                                   reward=m["rollout/reward"])
            bar.update()
            if (tr.eval_every and state.step % tr.eval_every == 0) or state.step == tr.max_steps:
                with full_params(exp.student):
                    state.history.append(evaluate_student(exp, state.step, logger, progress=eval_bars(tr)))
            state.train_s += time.time() - t_step
            if every and state.step % every == 0:
                checkpoint(exp, state, run_dir)
            if _stop_requested(exp, stop) and state.step < tr.max_steps:
                done = run_dir / "checkpoints" / f"step_{state.step}"
                raise Stopped(_signame(stop), done if every and state.step % every == 0 else checkpoint(exp, state, run_dir))


def after_update(exp: Experiment) -> dict:
    """rollout.engine=vllm: the new weights into the live vLLM engine (verified), and the step's time split
    (``time/decode_s``, ``time/teacher_pass_s``, ``time/weight_sync_s``); other engines: nothing."""
    if exp.rollout.engine != "vllm":
        return {}
    engine = vllm_rollouts()
    engine.mark_updated()
    engine.sync()
    return engine.times.metrics()


def _stop_requested(exp: Experiment, stop: StopSignals | None) -> bool:
    """A stop signal on any rank (torchrun forwards signals to every rank, not at the same instant)."""
    return exp.dist.any(stop is not None and stop.requested is not None)


def _signame(stop: StopSignals | None) -> str:
    return (stop.requested if stop is not None else None) or "SIGTERM"


def eval_bars(tr) -> bool:
    """The evaluation's own progress bars: on a terminal only (in a log file they would be noise)."""
    return bool(tr.get("progress", True)) and sys.stderr.isatty()


def progress_line(m: dict) -> str:
    keys = (("loss", "train/loss"), ("eps", "trb/eps"), ("beta", "trb/beta_mean"), ("reward", "rollout/reward"))
    return " ".join(f"{name}={m[k]:.3g}" for name, k in keys if isinstance(m.get(k), (int, float)))


def run(cfg: DictConfig, run_dir: Path, stop: StopSignals | None = None, on_accept=None,
        dist: DistContext | None = None) -> dict:
    """Train (or resume) the run of ``cfg`` in ``run_dir``; returns the summary. ``on_accept(checkpoint)``
    is called once the config and the run directory passed their checks, before any model is loaded;
    ``stop`` (a ``StopSignals``) makes the loop checkpoint and raise ``Stopped`` on a signal; ``dist``: this
    process's rank under torchrun (rank 0 alone checks and writes the run directory)."""
    dist = dist or DistContext()
    run_dir = Path(run_dir)
    ckpt, method, rollout = accept(cfg, run_dir, dist)
    if on_accept is not None:
        on_accept(ckpt)
    exp = build(cfg, dist, method, rollout)
    state = TrainState.create(exp.student, cfg, exp.device)
    if dist.active:  # a sampling stream per rank
        state.generator.manual_seed(rank_seed(int(cfg.seed), dist.rank))
    state.extras.update(exp.stateful)  # e.g. an adaptive budget: checkpointed and restored by name
    resume_step = None
    if ckpt is not None:
        resume_step = restore(state, exp.train_student, ckpt, run_dir, dist)
        if exp.rollout.engine == "vllm":  # the restored weights into the vLLM engine
            vllm_rollouts().mark_updated()
        print(f"[resume] {ckpt} (step {state.step} of {cfg.trainer.max_steps})", flush=True)
    elif (run_dir / "metrics.jsonl").exists():  # the same run, stopped before its first checkpoint
        resume_step = -1
    logger = NullLogger() if not dist.is_main else RunLogger(
        run_dir, backend=cfg.logger.backend, project=cfg.logger.project, name=f"{exp.method.name}-s{cfg.seed}",
        mode=cfg.logger.mode, config=OmegaConf.to_container(cfg, resolve=True), run_id=state.run_id,
        resume_step=resume_step)
    state.run_id = logger.run_id
    if ckpt is None:
        with full_params(exp.student):
            state.history = [evaluate_student(exp, 0, logger, progress=eval_bars(cfg.trainer))]
        t0 = time.time()
        if exp.method.sft_updates:
            warm_start(exp, state, logger)
        state.train_s += time.time() - t0
    try:
        train(exp, state, logger, run_dir, stop)
    finally:
        logger.close()
        if exp.rollout.engine == "vllm":
            close_rollouts()
    return finish(exp, state, run_dir)


def accept(cfg: DictConfig, run_dir: Path, dist: DistContext) -> tuple[Path | None, Method, RolloutConfig]:
    """The config and the run directory's checks, before any model is loaded (rank 0 checks, every rank
    raises the same error or gets the same checkpoint to resume from, None for a fresh start). Returns that
    checkpoint, the method and the rollout config, built here once (their errors come before any model loads)."""
    validate(cfg)
    check_strategy(cfg, dist)
    ckpt = method = rollout = err = None
    try:
        if dist.is_main:
            ckpt = resume_from(cfg, run_dir)
        method = Method.from_cfg(cfg.method, cfg.schedule)  # every rank builds the same one from the same config
        rollout = RolloutConfig.from_cfg(cfg, method)
        if rollout.engine == "vllm" and str(cfg.trainer.get("strategy", "auto")) == "fsdp":
            raise ConfigError("rollout.engine=vllm: trainer.strategy=fsdp shards the student, and the vLLM engine "
                              "needs its whole weights after every step; use trainer.strategy=ddp or rollout.engine=static")
    except ConfigError as e:
        err = e
    ckpt, message = dist.broadcast((ckpt, None if err is None else str(err)))  # every rank stops, or resumes alike
    if err is not None:
        raise err  # as raised (a FinishedRun stays one: a re-submitted sweep skips the job)
    if message is not None:
        raise ConfigError(message)
    return ckpt, method, rollout


def build(cfg: DictConfig, dist: DistContext, method: Method, rollout: RolloutConfig) -> Experiment:
    """``experiment.setup`` plus this process's rank and the student as it trains (DDP / FSDP2 wrapped)."""
    exp = setup(cfg, method, rollout)
    train_student = wrap_student(exp.student, dist, str(cfg.trainer.get("strategy", "auto")))
    rollout = exp.rollout
    if train_student is exp.student and dist.active and rollout.engine == "static":
        # FSDP2 shards the student in place; the static engine reads whole weights: the eager loop decodes
        # (it computes the same tokens, bit for bit on a CPU)
        print("[rollout] trainer.strategy=fsdp shards the student: decoding with rollout.engine=eager", flush=True)
        rollout = rollout.eager()
    return replace(exp, dist=dist, train_student=train_student, rollout=rollout)


def finish(exp: Experiment, state: TrainState, run_dir: Path) -> dict:
    """The run's summary; rank 0 writes it and the trained student (one consolidated model under FSDP2)."""
    tr, dist = exp.cfg.trainer, exp.dist
    summary = {
        "method": exp.method.name, "seed": int(exp.cfg.seed), "steps": int(tr.max_steps),
        "train_s": round(state.train_s, 2), "initial": state.history[0], "final": state.history[-1],
        "peak_rss_mb": peak_rss_mb(), "env": current_environment().as_dict(),
    }
    if tr.save_student and is_fsdp(exp.student):  # gathered from the shards on rank 0
        weights = full_state_dict(exp.student, dist)
        if dist.is_main:
            save_consolidated(exp.student, weights, run_dir / "student")
            exp.tok.save_pretrained(run_dir / "student")
    elif tr.save_student and dist.is_main:
        exp.student.save_pretrained(run_dir / "student")  # safetensors
        exp.tok.save_pretrained(run_dir / "student")
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.barrier()
    return summary


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
