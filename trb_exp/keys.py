"""Config keys nobody reads, and booleans where a number is expected: ``+trainer.max_step=5`` (a typo, added
with ``+``) or ``+foo=1`` would compose and then be ignored, so the setting is silently lost;
``trainer.max_steps=true`` would pass as 1. A key is known when a YAML file of ``conf/`` sets it
(``config.yaml`` / ``evaluate.yaml``, or an option of one of their groups); an unknown key is one line with
the nearest known key. Not checked: ``hydra.*`` (Hydra's own), ``method.*`` (``methods.py`` refuses a knob
no component reads) and the free-form namespaces: those in ``FREE_FORM`` and every mapping a YAML file
leaves empty (``dataset.filter: {}``, ``model.chat_template_kwargs: {}``); a value replacing a scalar or
null key (``dataset.data_files={train: ...}``) may hold any keys. Torch-free: the CLI runs it before its imports.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

from trb_exp import CONF_DIR
from trb_exp.errors import ConfigError

GROUPS = ("model", "dataset", "schedule", "method", "logger")  # config groups whose options are nodes
NOT_CHECKED = ("hydra", "method")
FREE_FORM = ("model.chat_template_kwargs",)  # documented as passed through as given


def _flat(node, prefix: str, out: dict[str, bool], values: dict[str, list]) -> None:
    """Dotted keys of a YAML mapping -> whether each is a node (a mapping) rather than a leaf; ``values``:
    every value each leaf is given."""
    for k, v in node.items():
        if k == "defaults" and not prefix:
            continue
        key = f"{prefix}{k}"
        out[key] = out.get(key, False) or (isinstance(v, dict) and bool(v))  # {}: an open mapping, any keys
        if isinstance(v, dict):
            _flat(v, key + ".", out, values)
        else:
            values.setdefault(key, []).append(v)


def known_keys(config_name: str = "config", conf_dir: str = CONF_DIR) -> dict[str, bool]:
    """Every key a YAML file of ``conf_dir`` sets for ``config_name`` (dotted) -> whether it is a node."""
    return _read(config_name, conf_dir)[0]


def yaml_values(config_name: str = "config", conf_dir: str = CONF_DIR) -> dict[str, list]:
    """Every value the YAML files give each leaf key (its default first)."""
    return _read(config_name, conf_dir)[1]


@functools.lru_cache(maxsize=4)
def _read(config_name: str, conf_dir: str) -> tuple[dict[str, bool], dict[str, list]]:
    from omegaconf import OmegaConf

    conf, out, values = Path(conf_dir), {}, {}
    files = [(conf / f"{config_name}.yaml", "")] + [(f, f"{g}.") for g in GROUPS for f in sorted((conf / g).glob("*.yaml"))]
    if config_name == "config":  # the experiment bundles (@package _global_) set keys of the training config
        files += [(f, "") for f in sorted((conf / "experiment").glob("*.yaml"))]
    for f, prefix in files:  # OmegaConf's YAML reading (1e-3 is a number, as in the composed config)
        _flat(OmegaConf.to_container(OmegaConf.load(f), resolve=False) or {}, prefix, out, values)
    for g in GROUPS:
        out[g] = True
    return out, values


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


def boolean_error(key: str, value, config_name: str = "config") -> ConfigError | None:
    """A boolean given for a key that no YAML file sets to one (``trainer.max_steps=true`` would run 1 step):
    the one-line error, else None."""
    given = yaml_values(config_name).get(key)
    if not isinstance(value, bool) or given is None or any(isinstance(v, bool) for v in given):
        return None
    example = next((v for v in given if v is not None), None)
    if example is None:
        return ConfigError(f"{key}={str(value).lower()}: true/false is not a value this key takes; see its comment "
                           f"in conf/{config_name}.yaml")
    kind = "an integer" if isinstance(example, int) else "a number" if isinstance(example, float) else "a string"
    return ConfigError(f"{key}={str(value).lower()}: a boolean where {kind} is expected; give {kind}, e.g. "
                       f"{key}={example}")


def check_keys(cfg, config_name: str = "config") -> None:
    """Every key of the composed ``cfg`` is read by something, and none that expects a number (or any other
    non-boolean) holds true/false (see the module's docstring)."""
    from omegaconf import DictConfig

    known = known_keys(config_name)

    def walk(node, prefix: str):
        for k in node.keys():
            key = f"{prefix}{k}"
            v = node._get_node(k)
            leaf = None if isinstance(v, DictConfig) or v._is_missing() or v._is_interpolation() else v._value()
            err = unknown_key_error(key, config_name) or boolean_error(key, leaf, config_name)
            if err is not None:
                raise err
            if isinstance(v, DictConfig) and known.get(key):
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
