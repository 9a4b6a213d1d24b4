"""The plan: call order, phases, capabilities, claims, and errors that name plugin and hook."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest

import memwise
from memwise import hookimpl, option, plan
from memwise.errors import ClaimConflict, MemwiseError, NoEffectWarning, PluginHookError
from memwise.host import PluginHost


def make(name, phase="runtime", provides=(), before=(), after=(), composes=(), calls=None, stages=("fit",)):
    class P(memwise.Plugin):
        @dataclass
        class Config:
            x: int = option(0, "a number")

        @hookimpl
        def memwise_on_train_batch_start(self, ctx, batch, batch_idx):
            calls.append(self.name)

        def provides(self):
            return set(provides)

    P.name, P.phase, P.before, P.after, P.composes_with, P.stages = name, phase, before, after, composes, stages
    return P()


def test_pluggy_call_order_is_plan_order():
    calls = []
    plugins = [make("late", "runtime", calls=calls), make("data", "data", calls=calls),
               make("wrap_b", "wrap", calls=calls), make("wrap_a", "wrap", before=("wrap_b",), calls=calls),
               make("prune", "prune", calls=calls)]
    ordered, problems = plan.order(plugins)
    assert not problems
    names = [p.name for p in ordered]
    assert names == ["data", "prune", "wrap_a", "wrap_b", "late"]
    PluginHost(ordered).hook.memwise_on_train_batch_start(ctx=None, batch=None, batch_idx=0)
    assert calls == names


def test_recipe_order_breaks_ties_and_cycles_are_reported():
    a, b = make("a", "wrap", calls=[]), make("b", "wrap", calls=[])
    assert [p.name for p in plan.order([b, a])[0]] == ["b", "a"]
    c, d = make("c", "wrap", before=("d",), calls=[]), make("d", "wrap", before=("c",), calls=[])
    _, problems = plan.order([c, d])
    assert any("cycle" in p.message for p in problems)


def test_exclusive_capability_conflict_names_both_unless_composed():
    a = make("alpha", provides=("activation.storage",), calls=[])
    b = make("beta", provides=("activation.storage",), calls=[])
    problems = plan.check([a, b], "fit")
    assert len(problems) == 1 and "'alpha'" in problems[0].message and "'beta'" in problems[0].message
    c = make("gamma", provides=("activation.storage",), composes=("alpha",), calls=[])
    assert plan.check([a, c], "fit") == []


def test_stage_mismatch_is_a_problem():
    g = make("gen", stages=("generate",), calls=[])
    problems = plan.check([g], "fit")
    assert problems and "memwise generate" in problems[0].message


def test_claims_ledger_conflict_unless_wraps():
    ledger = plan.ClaimsLedger()
    a, b = make("a", calls=[]), make("b", calls=[])
    ledger.claim("model.layers.0.mlp", a)
    with pytest.raises(ClaimConflict, match="already replaced by plugin 'a'"):
        ledger.claim("model.layers.0.mlp", b)
    b.wraps = True
    ledger.claim("model.layers.0.mlp", b)
    assert ledger.owner["model.layers.0.mlp"] == "b"


def test_hook_error_names_plugin_and_hook():
    class Broken(memwise.Plugin):
        name = "broken"

        @hookimpl
        def memwise_transform_model(self, ctx):
            raise ValueError("boom")

    with pytest.raises(PluginHookError, match="plugin 'broken' failed in hook 'memwise_transform_model'.*boom"):
        PluginHost([Broken()]).hook.memwise_transform_model(ctx=None)


def test_unknown_hook_name_fails_at_registration():
    class Typo(memwise.Plugin):
        name = "typo"

        @hookimpl
        def memwise_transfrom_model(self, ctx):
            pass

    with pytest.raises(MemwiseError, match="typo"):
        PluginHost([Typo()])


def test_no_effect_warning(make_llama):
    class Idle(memwise.Plugin):
        name = "idle"

        @hookimpl
        def memwise_transform_model(self, ctx):
            pass

    ctx = memwise.RunContext(stage="fit", model=make_llama())
    with pytest.warns(NoEffectWarning, match="idle"):
        PluginHost([Idle()]).transform_model(ctx)


def test_config_validation_in_python_api():
    p = make("cfg", calls=[])
    with pytest.raises(memwise.RecipeError, match="cfg.y: unknown key"):
        type(p)(y=1)
    with pytest.raises(memwise.RecipeError, match="expected int"):
        type(p)(x="three")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(p)(x=3).config.x == 3
