"""Behaviour rules: how a rollout's next token is drawn from the student's and the teacher's
next-token distributions. One module per rule; each defines

- a *sampler* (e.g. ``StudentSampler``): the per-step callable the decode loops (``decode.backend.sample``:
  ``decode/eager.py``, ``decode/static.py``) call with the two models' logits, returning the behaviour log-probs and
  per-token diagnostics;
- a registered ``Rule`` (``@register("student")``): the rule as a method configures it. A frozen
  dataclass whose fields are its knobs (read from ``method.*``, defaults written once, checked by its
  ``validate``: one ``ConfigError`` line per bad value), which builds the sampler of step k (``at``),
  reports its knobs (``knobs``) and summarises its per-token diagnostics (``summarize``: the ``trb/*``,
  ``skd/*`` metrics), and owns its schedule if it has one.

A method names its rule with ``method.rollout``. Adding a rule = adding a module here: the package
imports every module in it, and ``@register`` makes it known; nothing else lists the rules.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings

from trb_exp.rules.base import RULES, Rule, Sampler, register, rule_class

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")

# the samplers, importable from the package (the decode loops call them)
from trb_exp.rules.greedy import GreedySampler  # noqa: E402
from trb_exp.rules.mixture import MixtureSampler  # noqa: E402
from trb_exp.rules.skd import SKDSampler  # noqa: E402
from trb_exp.rules.student import StudentSampler  # noqa: E402
from trb_exp.rules.teacher import TeacherSampler  # noqa: E402
from trb_exp.rules.trust_region import TrustRegionSampler  # noqa: E402

# the samplers' names before they were called samplers: deprecated, each warns once (DeprecationWarning)
DEPRECATED = {"GreedyRule": GreedySampler, "MixtureRule": MixtureSampler, "SKDRule": SKDSampler,
              "StudentRule": StudentSampler, "TeacherRule": TeacherSampler, "TrustRegionRule": TrustRegionSampler}
_warned: set[str] = set()


def __getattr__(name: str):
    if name in DEPRECATED:
        new = DEPRECATED[name]
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"trb_exp.rules.{name} is deprecated: use trb_exp.rules.{new.__name__} (the same class)",
                          DeprecationWarning, stacklevel=2)
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RULES", "GreedySampler", "MixtureSampler", "Rule", "SKDSampler", "Sampler", "StudentSampler",
           "TeacherSampler", "TrustRegionSampler", "register", "rule_class"]
