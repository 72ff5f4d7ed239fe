"""Early, one-line validation of the composed Hydra config.

``validate(cfg)`` runs before any model is loaded: a bad value stops the run with a
``ConfigError`` whose message names the field and the fix; the entrypoint prints it as one line.
Method and schedule fields are checked by ``methods.Method.from_cfg``, the ``rollout`` group and
``model.teacher_pass`` by ``decode.config.RolloutConfig`` (both built once in ``trainer.accept``, before any
model is loaded).
"""

from __future__ import annotations

import math

from trb_exp.errors import ConfigError  # noqa: F401  (re-exported: the modules raise config.ConfigError)

EMBEDDED_PAIRS = ("a", "b", "a32", "c", "d", "e")  # the named tiny pairs (trb_exp.prepare.PAIRS)


def _require(cond: bool, field: str, value, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{field}={value!r}: {fix}")


def is_number(v) -> bool:
    """A finite int or float (not a bool, not a string such as 'abc', not inf/nan)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(v, field: str, fix: str = "must be a finite number") -> float:
    _require(is_number(v), field, v, fix)
    return float(v)


def integer(v, field: str, fix: str = "must be an integer") -> int:
    _require(isinstance(v, int) and not isinstance(v, bool), field, v, fix)
    return int(v)


# what to write for a required value left unset (??? in the YAML)
EXAMPLES = {
    "model.student": "a hub id or a local directory, e.g. model.student=Qwen/Qwen3-0.6B-Base",
    "model.teacher": "a hub id or a local directory of the same family, e.g. model.teacher=Qwen/Qwen3-4B",
    "dataset.train_file": "a JSONL file with prompt and answer fields, e.g. dataset.train_file=data/train.jsonl",
    "dataset.test_file": "a JSONL file with prompt and answer fields, e.g. dataset.test_file=data/test.jsonl",
}


def check_missing(cfg, skip: tuple[str, ...] = ()) -> None:
    """A required value left unset (``???``) is one line naming the key and an example."""
    from omegaconf import OmegaConf

    order = list(EXAMPLES)
    for key in sorted(OmegaConf.missing_keys(cfg), key=lambda k: (order.index(k) if k in order else len(order), k)):
        if key in skip or key.startswith("hydra."):
            continue
        raise ConfigError(f"{key} is not set: give {EXAMPLES.get(key, f'a value, e.g. {key}=...')}")


def check_device(value, field: str = "device") -> None:
    """``cuda`` / ``cuda:N`` on a machine without that GPU is one line (torch is imported lazily)."""
    d = str(value)
    _require(d == "auto" or d.split(":")[0] in ("cpu", "cuda", "mps"), field, value, "use auto, cpu, cuda or cuda:N")
    if d.startswith("cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        idx = d.split(":", 1)[1] if ":" in d else "0"
        _require(idx.isdigit(), field, value, "use cuda or cuda:N with N a GPU index")
        _require(int(idx) < n, field, value,
                 f"this machine has {n} CUDA GPU(s) visible; use device=auto or cpu" if n == 0 else
                 f"this machine has {n} CUDA GPU(s) visible (cuda:0..cuda:{n - 1})")
    if d == "mps":
        import torch

        _require(torch.backends.mps.is_available(), field, value, "MPS is not available here; use auto or cpu")


def validate(cfg) -> None:
    """The training config, before any model is loaded: one ``ConfigError`` line naming the field and the fix."""
    from trb_exp.keys import check_keys

    check_missing(cfg)
    check_keys(cfg)  # a key nobody reads (a typo added with +), a boolean where a number is expected
    _validate_trainer(cfg.trainer)
    _validate_optim(cfg.optim)
    _require(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool), "seed", cfg.seed, "must be an integer")
    th = cfg.get("threads")
    _require(th is None or (isinstance(th, int) and not isinstance(th, bool) and th >= 0), "threads", th,
             "must be an integer >= 0 (0 = torch's default)")
    _validate_model(cfg)
    _require(cfg.logger.backend in ("wandb", "none"), "logger.backend", cfg.logger.backend,
             "use logger=wandb or logger=none")


def _validate_trainer(tr) -> None:
    for name in ("max_steps", "eval_every"):
        v = tr[name]
        _require(isinstance(v, int) and v >= 0, f"trainer.{name}", v, "must be an integer >= 0")
    for name in ("prompts_per_step", "rollouts_per_prompt", "micro_batch_size", "max_new_tokens", "log_every"):
        v = tr[name]
        _require(isinstance(v, int) and v >= 1, f"trainer.{name}", v, "must be an integer >= 1")
    es = tr.eval_samples
    _require(es is None or (isinstance(es, int) and es >= 1), "trainer.eval_samples", es,
             "must be null (each benchmark's own n, the paper's counts) or an integer >= 1")
    for name in ("checkpoint_every", "keep_checkpoints"):
        v = tr.get(name) or 0
        _require(isinstance(v, int) and v >= 0, f"trainer.{name}", v, "must be an integer >= 0 (0 = off / all)")
    res = tr.get("resume", "auto")
    _require(isinstance(res, str) and res != "", "trainer.resume", res,
             "use auto (continue the run dir's newest checkpoint), never, or a checkpoint path")
    rb = tr.get("rollout_batch_size")
    _require(rb is None or (isinstance(rb, int) and rb >= 1), "trainer.rollout_batch_size", rb,
             "must be null (the whole step at once) or an integer >= 1")
    _require(tr.eval_size is None or (isinstance(tr.eval_size, int) and tr.eval_size >= 1),
             "trainer.eval_size", tr.eval_size, "must be null (whole test split) or an integer >= 1")
    _require(is_number(tr.temperature) and tr.temperature > 0, "trainer.temperature",
             tr.temperature, "sampling temperature must be a finite number > 0")


def _validate_optim(op) -> None:
    _require(is_number(op.lr) and op.lr > 0, "optim.lr", op.lr, "must be a finite number > 0")
    _require(is_number(op.grad_clip) and op.grad_clip > 0, "optim.grad_clip", op.grad_clip, "must be a finite number > 0")
    _require(is_number(op.weight_decay) and op.weight_decay >= 0, "optim.weight_decay", op.weight_decay,
             "must be a finite number >= 0")
    betas = list(op.betas) if not isinstance(op.betas, (str, int, float)) else [op.betas]
    _require(len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas), "optim.betas", betas,
             "give two values in [0, 1), e.g. optim.betas=[0.9,0.999]")
    _require(isinstance(op.warmup_steps, int) and op.warmup_steps >= 0, "optim.warmup_steps",
             op.warmup_steps, "must be an integer >= 0")


def _validate_model(cfg) -> None:
    check_device(cfg.device)
    if cfg.model.get("teacher_device"):
        check_device(cfg.model.teacher_device, "model.teacher_device")
    _require(cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype", cfg.model.dtype,
             "use auto, float32, bfloat16 or float16")
    if cfg.model.dtype == "float16":
        import torch

        on_cpu = str(cfg.device) == "cpu" or (str(cfg.device) == "auto" and not torch.cuda.is_available())
        _require(not on_cpu, "model.dtype", cfg.model.dtype,
                 "float16 training does not work on the CPU; use auto (float32 there), float32 or bfloat16")
    pair = cfg.model.get("embedded_pair", "a")
    _require(pair in EMBEDDED_PAIRS, "model.embedded_pair", pair,
             "use a (the default tiny pair), b (the larger one, model=embedded_b), a32 (head_dim 32 for vLLM, "
             "model=embedded_a32) or c, d, e (the generalisation study's, model=embedded_c / _d / _e)")


def validate_eval(cfg) -> None:
    """``trb_exp.evaluate``'s own config, before any model is loaded."""
    from trb_exp.keys import check_keys

    check_missing(cfg, skip=("model.teacher",))
    check_keys(cfg, "evaluate")
    ev = cfg.eval
    th = cfg.get("threads")
    _require(th is None or (isinstance(th, int) and not isinstance(th, bool) and th >= 0), "threads", th,
             "must be an integer >= 0 (0 = torch's default)")
    check_device(cfg.device)
    n = ev.get("samples")
    _require(n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 1), "eval.samples", n,
             "must be null (each benchmark's own n) or an integer >= 1")
    ks = ev.get("ks")
    if ks is not None:
        ks = list(ks) if not isinstance(ks, (int, str)) else [ks]
        _require(all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks), "eval.ks", ks,
                 "give integers >= 1, e.g. eval.ks=[1,4,16]")
    for name in ("max_new_tokens", "batch_size"):
        v = ev.get(name)
        _require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"eval.{name}", v, "must be an integer >= 1")
    _require(is_number(ev.get("temperature")) and ev.temperature > 0, "eval.temperature", ev.get("temperature"),
             "must be a finite number > 0")
    size = ev.get("size")
    _require(size is None or (isinstance(size, int) and size >= 1), "eval.size", size,
             "must be null (every problem) or an integer >= 1")
    _require(ev.get("engine", "eager") in ("eager", "static", "vllm"), "eval.engine", ev.get("engine"),
             "use eager (any model), static (Llama/Qwen2/Qwen3/Mistral) or vllm")


def check_ks(ks, benchmarks) -> None:
    """pass@k needs k <= n samples per problem on every benchmark: never silently dropped."""
    for b in benchmarks if ks else ():
        big = [k for k in ks if k > b.n_samples]
        _require(not big, "eval.ks", list(ks), f"pass@{big[0] if big else 0} needs at least that many samples per "
                 f"problem, but {b.name} draws n={b.n_samples}; lower eval.ks or raise eval.samples")
