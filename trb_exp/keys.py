"""Config keys nobody reads: ``+trainer.max_step=5`` (a typo, added with ``+``) or ``+foo=1`` would compose
and then be ignored, so the setting is silently lost. A key is known when a YAML file of ``conf/`` sets it
(``config.yaml`` / ``evaluate.yaml``, or an option of one of their groups); an unknown key is one line with
the nearest known key. Not checked: ``hydra.*`` (Hydra's own), ``method.*`` (``methods.py`` refuses a knob
no component reads) and the free-form namespaces in ``FREE_FORM``; a value replacing a scalar or null key
(``dataset.data_files={train: ...}``) may hold any keys. Torch-free: the CLI runs it before its imports.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

from trb_exp import CONF_DIR
from trb_exp.config import ConfigError

GROUPS = ("model", "dataset", "schedule", "method", "logger")  # config groups whose options are nodes
NOT_CHECKED = ("hydra", "method")
FREE_FORM = ("model.chat_template_kwargs",)  # documented as passed through as given


def _flat(node, prefix: str, out: dict[str, bool]) -> None:
    """Dotted keys of a YAML mapping -> whether each is a node (a mapping) rather than a leaf."""
    for k, v in node.items():
        if k == "defaults" and not prefix:
            continue
        key = f"{prefix}{k}"
        out[key] = isinstance(v, dict)
        if isinstance(v, dict):
            _flat(v, key + ".", out)


@functools.lru_cache(maxsize=4)
def known_keys(config_name: str = "config", conf_dir: str = CONF_DIR) -> dict[str, bool]:
    """Every key a YAML file of ``conf_dir`` sets for ``config_name`` (dotted) -> whether it is a node."""
    import yaml

    conf, out = Path(conf_dir), {}
    files = [(conf / f"{config_name}.yaml", "")] + [(f, f"{g}.") for g in GROUPS for f in sorted((conf / g).glob("*.yaml"))]
    if config_name == "config":  # the experiment bundles (@package _global_) set keys of the training config
        files += [(f, "") for f in sorted((conf / "experiment").glob("*.yaml"))]
    for f, prefix in files:
        _flat(yaml.safe_load(f.read_text()) or {}, prefix, out)
    for g in GROUPS:
        out[g] = True
    return out


def unknown_key_error(key: str, config_name: str = "config") -> ConfigError | None:
    """The one-line error for setting ``key`` (dotted), or None when something reads it."""
    known = known_keys(config_name)
    if key in known or key.split(".")[0] in NOT_CHECKED or any(key == f or key.startswith(f + ".") for f in FREE_FORM):
        return None
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest known prefix: a leaf there may take any value
        prefix = ".".join(parts[:i])
        if prefix in known:
            if not known[prefix]:
                return None
            break
    near = difflib.get_close_matches(key, [k for k in known if not known[k]], n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}?" if near else f"see conf/{config_name}.yaml for the settings"
    return ConfigError(f"{key}: no such setting, so nothing would read it; {hint}")


def check_keys(cfg, config_name: str = "config") -> None:
    """Every key of the composed ``cfg`` is read by something (see the module's docstring)."""
    from omegaconf import DictConfig

    def walk(node, prefix: str):
        for k in node.keys():
            key = f"{prefix}{k}"
            err = unknown_key_error(key, config_name)
            if err is not None:
                raise err
            v = node._get_node(k)
            if isinstance(v, DictConfig) and key in known_keys(config_name) and known_keys(config_name)[key]:
                walk(v, key + ".")

    walk(cfg, "")


def check_overrides(args: list[str], config_name: str = "config") -> None:
    """The command line's ``key=value`` overrides (``+``/``++`` included; group choices, ``~`` deletions and
    Hydra's own flags left to Hydra): each key must be one something reads."""
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    for a in args:
        if a.startswith(("-", "~")) or "=" not in a:
            continue
        key = a.split("=", 1)[0].lstrip("+")
        if key in groups or "/" in key or "@" in key:
            continue
        err = unknown_key_error(key, config_name)
        if err is not None:
            raise err
