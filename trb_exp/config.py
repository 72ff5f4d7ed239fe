"""Early, one-line validation of the composed Hydra config.

``validate(cfg)`` runs before any model is loaded: a bad value stops the run with a
``ConfigError`` whose message names the field and the fix; the entrypoint prints it as one line.
Method and schedule fields are checked by ``methods.Method.validate``.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad input: its message is one line naming the field and the fix."""


def _require(cond: bool, field: str, value, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{field}={value!r}: {fix}")


def validate(cfg) -> None:
    tr, op = cfg.trainer, cfg.optim
    for name in ("max_steps", "eval_every"):
        v = tr[name]
        _require(isinstance(v, int) and v >= 0, f"trainer.{name}", v, "must be an integer >= 0")
    for name in ("prompts_per_step", "rollouts_per_prompt", "micro_batch_size", "max_new_tokens", "log_every"):
        v = tr[name]
        _require(isinstance(v, int) and v >= 1, f"trainer.{name}", v, "must be an integer >= 1")
    es = tr.eval_samples
    _require(es is None or (isinstance(es, int) and es >= 1), "trainer.eval_samples", es,
             "must be null (each benchmark's own n, the paper's counts) or an integer >= 1")
    rb = tr.get("rollout_batch_size")
    _require(rb is None or (isinstance(rb, int) and rb >= 1), "trainer.rollout_batch_size", rb,
             "must be null (the whole step at once) or an integer >= 1")
    _require(tr.eval_size is None or (isinstance(tr.eval_size, int) and tr.eval_size >= 1),
             "trainer.eval_size", tr.eval_size, "must be null (whole test split) or an integer >= 1")
    _require(isinstance(tr.temperature, (int, float)) and tr.temperature > 0, "trainer.temperature",
             tr.temperature, "sampling temperature must be > 0")
    _require(isinstance(op.lr, (int, float)) and op.lr > 0, "optim.lr", op.lr, "must be > 0")
    _require(op.grad_clip > 0, "optim.grad_clip", op.grad_clip, "must be > 0")
    _require(op.weight_decay >= 0, "optim.weight_decay", op.weight_decay, "must be >= 0")
    _require(len(op.betas) == 2 and all(0 <= b < 1 for b in op.betas), "optim.betas", list(op.betas),
             "give two values in [0, 1)")
    _require(isinstance(op.warmup_steps, int) and op.warmup_steps >= 0, "optim.warmup_steps",
             op.warmup_steps, "must be an integer >= 0")
    _require(isinstance(cfg.seed, int), "seed", cfg.seed, "must be an integer")
    _require(cfg.device == "auto" or str(cfg.device).split(":")[0] in ("cpu", "cuda", "mps"), "device",
             cfg.device, "use auto, cpu, cuda or cuda:N")
    _require(cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype", cfg.model.dtype,
             "use auto, float32, bfloat16 or float16")
    pair = cfg.model.get("embedded_pair", "a")
    _require(pair in ("a", "b"), "model.embedded_pair", pair,
             "use a (the default tiny pair) or b (the larger one, model=embedded_b)")
    ro = cfg.get("rollout") or {}
    _require(ro.get("engine", "eager") in ("eager", "static"), "rollout.engine", ro.get("engine"), "use eager or static")
    _require(isinstance(ro.get("compile", False), bool), "rollout.compile", ro.get("compile"), "use true or false")
    _require(isinstance(ro.get("compact", True), bool), "rollout.compact", ro.get("compact"), "use true or false")
    se = ro.get("sync_every")
    _require(se is None or (isinstance(se, int) and se >= 1), "rollout.sync_every", se,
             "must be null (1 on CPU, 16 on GPU) or an integer >= 1")
    si = ro.get("solver_iters")
    _require(si is None or (isinstance(si, int) and si >= 1), "rollout.solver_iters", si,
             "must be null (stop at convergence) or an integer >= 1")
    _require(ro.get("teacher_stats", "full") in ("full", "topk", "auto"), "rollout.teacher_stats",
             ro.get("teacher_stats"), "use full ([B, T, V] teacher log-probs), topk (O(B*T*k)) or auto (topk where "
             "the method's loss allows it)")
    _require(cfg.logger.backend in ("wandb", "none"), "logger.backend", cfg.logger.backend,
             "use logger=wandb or logger=none")
