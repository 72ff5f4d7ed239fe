"""The samplers' old names (``TrustRegionRule``, ``StudentRule``, ...: README, docs, user code) still import from
``trb_exp.rules`` as the renamed classes, with one DeprecationWarning per name."""

import warnings

import pytest

import trb_exp.rules as rules

OLD = ["GreedyRule", "MixtureRule", "SKDRule", "StudentRule", "TeacherRule", "TrustRegionRule"]


@pytest.mark.parametrize("old", OLD)
def test_an_old_sampler_name_is_the_new_class_and_warns_once(old, monkeypatch):
    monkeypatch.setattr(rules, "_warned", set())
    new = old.removesuffix("Rule") + "Sampler"
    with pytest.warns(DeprecationWarning, match=rf"^trb_exp\.rules\.{old} is deprecated: use trb_exp\.rules\.{new} "):
        cls = getattr(rules, old)
    assert cls is getattr(rules, new) and cls.__name__ == new
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second use does not warn again
        exec(f"from trb_exp.rules import {old}", {})


def test_the_from_import_form_warns_and_an_unknown_name_is_an_attribute_error(monkeypatch):
    monkeypatch.setattr(rules, "_warned", set())
    with pytest.warns(DeprecationWarning, match="TrustRegionRule is deprecated"):
        from trb_exp.rules import TrustRegionRule
    assert TrustRegionRule(eps=0.1).eps == 0.1
    with pytest.raises(AttributeError, match="NoSuchRule"):
        rules.NoSuchRule
