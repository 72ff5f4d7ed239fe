"""Behaviour rules: how a rollout's next token is drawn from the student's and the teacher's
next-token distributions. One module per rule; each defines

- a *sampler* (e.g. ``StudentRule``): the per-step callable the decode loops (``rollout.sample``,
  ``engine.sample_static``) call with the two models' logits, returning the behaviour log-probs and
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

from trb_exp.rules.base import RULES, Rule, Sampler, register, rule_class

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_m}")

# the samplers, importable from the package (the decode loops call them)
from trb_exp.rules.greedy import GreedyRule  # noqa: E402
from trb_exp.rules.mixture import MixtureRule  # noqa: E402
from trb_exp.rules.skd import SKDRule  # noqa: E402
from trb_exp.rules.student import StudentRule  # noqa: E402
from trb_exp.rules.teacher import TeacherRule  # noqa: E402
from trb_exp.rules.trust_region import TrustRegionRule  # noqa: E402

__all__ = ["RULES", "GreedyRule", "MixtureRule", "Rule", "SKDRule", "Sampler", "StudentRule", "TeacherRule",
           "TrustRegionRule", "register", "rule_class"]
