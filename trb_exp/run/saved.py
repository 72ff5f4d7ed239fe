"""A training run's own config, for scoring the run as it was trained.

``python -m trb_exp.evaluate run=<run dir>`` (or ``model.student=<run dir>/student``, or a checkpoint's
``student/`` inside it) reads the run's ``.hydra/config.yaml`` and takes from it, unless the command line
sets them: the student (``<run dir>/student``), its prompt format (``model.chat_template``,
``system_prompt``, ``plain_template``, ``chat_template_kwargs``, ``trust_remote_code``, ``dtype``,
``embedded_pair``), the task (``dataset``), the benchmarks (``eval.benchmarks``) and the response length
limit (``trainer.max_new_tokens`` as ``eval.max_new_tokens``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trb_exp.config import ConfigError

SAVED = Path(".hydra") / "config.yaml"
MODEL_FORMAT = ("chat_template", "system_prompt", "plain_template", "chat_template_kwargs", "trust_remote_code",
                "dtype", "embedded_pair")


def run_dir_of(path) -> Path | None:
    """The training run directory ``path`` is, or whose student (``student/``, a checkpoint's
    ``checkpoints/step_<k>/student/``) it is; None otherwise."""
    p = Path(str(path)).expanduser()
    for d in (p, p.parent, *p.parents[1:3]):
        if (d / SAVED).is_file():
            return d
    return None


def explicit_keys(overrides) -> set[str]:
    """The dotted keys (and group names) the command line sets: ``dataset=gsm8k`` -> ``dataset``."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides or [] if "=" in o}


def _given(key: str, explicit: set[str]) -> bool:
    return any(e == key or e.startswith(key + ".") or key.startswith(e + ".") for e in explicit)


def evaluation_config(cfg: DictConfig, explicit: set[str]) -> DictConfig:
    """``cfg`` (the composed ``evaluate`` config) with the defaults of the run named by ``run=`` or found
    around ``model.student``; unchanged when there is no run. ``explicit``: what the command line set."""
    run = cfg.get("run")
    run_dir = Path(str(run)).expanduser() if run else run_dir_of(cfg.model.get("student") or "")
    if run_dir is None:
        return cfg
    if not (run_dir / SAVED).is_file():
        raise ConfigError(f"run={str(run)!r}: not a training run directory (no {SAVED}); give the directory a "
                          "python -m trb_exp.train run wrote")
    try:
        saved = OmegaConf.load(run_dir / SAVED)
    except Exception as e:  # noqa: BLE001 -- a damaged YAML file: yaml's own error types
        raise ConfigError(f"run={str(run_dir)!r}: {run_dir / SAVED} does not load ({type(e).__name__}); the run's "
                          "saved config is damaged") from None
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # not struct: the run's keys may be new
    if run and "model.student" not in explicit:
        if not (run_dir / "student" / "config.json").is_file():
            raise ConfigError(f"run={str(run)!r}: the run has no student/ (still running, or "
                              "trainer.save_student=false); give model.student=<run dir>/checkpoints/step_<k>/student")
        out.model.student = str(run_dir / "student")
    if "model" not in explicit:  # model=<group> names another format on purpose
        for k in MODEL_FORMAT:
            if k in saved.get("model", {}) and not _given(f"model.{k}", explicit):
                out.model[k] = saved.model[k]
    if "dataset" in saved and not _given("dataset", explicit):
        out.dataset = saved.dataset
    benchmarks = saved.get("eval", {}).get("benchmarks")
    if benchmarks and not _given("eval.benchmarks", explicit):
        out.eval.benchmarks = benchmarks
    if saved.get("trainer", {}).get("max_new_tokens") and not _given("eval.max_new_tokens", explicit):
        out.eval.max_new_tokens = saved.trainer.max_new_tokens
    print(f"[evaluate] run {run_dir}: the student's prompt format, dataset {out.dataset.get('name')!r}, benchmarks "
          f"and max_new_tokens={out.eval.max_new_tokens} from its {SAVED}", flush=True)
    return out
