"""Reading a component's knobs from its config group: each behaviour rule (``trb_exp.rules``), loss
(``trb_exp.objectives``), schedule (``trb_exp.schedules.Schedule``) and ``methods.Method`` is a frozen
dataclass whose fields are its knobs, with their defaults written once there. ``knobs_from`` reads
those fields from a config (a value of the wrong kind is a one-line ``ConfigError``); the component's
own ``validate`` then checks the values' ranges. Torch-free."""

from __future__ import annotations

import dataclasses

from trb_exp.config import ConfigError, is_number

NOT_A_KNOB = {"knob": False}  # dataclasses.field(metadata=NOT_A_KNOB): state or wiring, not read from the config


def checked(name: str, v, default):
    """``v`` when it has the kind of ``default`` (an int field takes an int, a float field any finite
    number, a string field a string); a string such as 'abc', inf or nan is a one-line ``ConfigError``."""
    if v is None or isinstance(v, str) and isinstance(default, str):
        return v
    if isinstance(default, int) and not isinstance(default, bool):
        if not (isinstance(v, int) and not isinstance(v, bool)):
            raise ConfigError(f"{name}={v!r}: must be an integer")
        return v
    if not is_number(v):
        raise ConfigError(f"{name}={v!r}: must be a finite number")
    return float(v) if isinstance(default, float) else v


def knob_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("knob", True) and f.init]


def knobs_from(cls, cfg, prefix: str, exclude=()) -> dict:
    """{field: value} for the knob fields of dataclass ``cls`` present in ``cfg`` (absent: the field's
    default), checked by kind; ``exclude``: fields the caller fills in itself."""
    out = {}
    for f in knob_fields(cls):
        if f.name in exclude or f.name not in cfg:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        v = checked(f"{prefix}.{f.name}", cfg.get(f.name), default)
        if default is None and v is not None and not isinstance(v, str):
            v = float(v)  # an optional number (e.g. method.t0)
        out[f.name] = v
    return out


def bad(name: str, value, fix: str):
    """The one-line error of a bad knob value: ``name=value: fix``."""
    raise ConfigError(f"{name}={value!r}: {fix}")


def ramp(step: int, start: float, end: float, K: int) -> float:
    """Linear from ``start`` at step 0 to ``end`` at step K, then ``end`` (K = 0: ``end`` throughout)."""
    if step >= K:
        return float(end)
    return start + (end - start) * step / K


class Registry(dict):
    """Components chosen by name from one config key (``method.rollout``: the rules; ``method.loss``: the
    losses). ``@registry.register(name)`` adds a class (and sets its ``name``); ``registry.lookup(name)`` is
    the class, or a one-line ``ConfigError`` naming the key and the choices (sorted, or in registration order)."""

    def __init__(self, field: str, *, sort_choices: bool = False):
        super().__init__()
        self.field, self.sort_choices = field, sort_choices

    def register(self, name: str):
        def deco(cls):
            if name in self and self[name] is not cls:
                raise ValueError(f"two classes registered as {self.field}={name!r}: {self[name].__module__}, "
                                 f"{cls.__module__}")
            cls.name = name
            self[name] = cls
            return cls

        return deco

    def lookup(self, name: str):
        if name not in self:
            choices = sorted(self) if self.sort_choices else list(self)
            raise ConfigError(f"{self.field}={name!r}: choose one of {', '.join(choices)}")
        return self[name]
