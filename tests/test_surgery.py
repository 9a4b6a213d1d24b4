"""memwise.surgery: one meaning of layers/include/exclude/kinds, and restore gives back the very model."""

from __future__ import annotations

import pytest
import torch

from memwise import surgery
from memwise.testing import tiny_llama


def snapshot(model: torch.nn.Module) -> dict:
    """Everything restore must give back: classes, instance attributes, parameter objects and values."""
    return {"classes": [(n, type(m)) for n, m in model.named_modules()],
            "attrs": [(n, sorted(vars(m))) for n, m in model.named_modules()],
            "params": [(n, id(p)) for n, p in model.named_parameters()],
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def assert_same(before: dict, after: dict) -> None:
    assert before["classes"] == after["classes"]
    assert before["attrs"] == after["attrs"]
    assert before["params"] == after["params"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


@pytest.mark.parametrize("spec, expected", [("all", [0, 1, 2, 3]), (None, [0, 1, 2, 3]), ([0, -1], [0, 3]),
                                            ("1-2", [1, 2]), ("0,2-3", [0, 2, 3]), ([3, 3, 1], [1, 3])])
def test_layer_indices_one_meaning(spec, expected):
    assert surgery.layer_indices(spec, 4) == expected


@pytest.mark.parametrize("spec", [[4], [-5], "5", "1-x", ["linear"], "some"])
def test_bad_layer_settings_name_the_forms(spec):
    with pytest.raises(surgery.LayerSelectionError) as err:
        surgery.layer_indices(spec, 4)
    assert isinstance(err.value, IndexError) and isinstance(err.value, ValueError)
    assert "out of range" in str(err.value) or "'1,3-5'" in str(err.value)


def test_select_layers_and_modules():
    model = tiny_llama(layers=3)
    assert [n for n, _ in surgery.select_layers(model, "1-2")] == ["model.layers.1", "model.layers.2"]
    found = {n: k for n, _, k in surgery.select_modules(model)}
    assert found["lm_head"] == "linear" and found["model.norm"] == "norm"
    assert found["model.layers.0.mlp"] == "glu" and found["model.layers.0.mlp.act_fn"] == "activation"
    assert found["model.layers.0.self_attn"] == "attention"
    assert found["model.layers.0.input_layernorm"] == "norm"
    # layers keeps to the chosen decoder layers (lm_head and the final norm are outside them)
    in_one = {n for n, _, _ in surgery.select_modules(model, layers=[1])}
    assert in_one and all(n.startswith("model.layers.1.") for n in in_one)
    assert len(in_one) == sum(1 for n in found if n.startswith("model.layers.1."))
    # include / exclude / kinds
    picked = {n for n, _, _ in surgery.select_modules(model, include=["*.mlp.*"], exclude=["*down_proj"],
                                                      kinds=["linear"])}
    assert picked == {f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("gate_proj", "up_proj")}
    assert surgery.selected("a.b", None, []) and not surgery.selected("a.b", ["x*"], [])


class Doubled:
    """A test mixin: the module's output doubled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class Halved:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 2


def _plus_one(module, forward, *args, **kwargs):
    out = forward(*args, **kwargs)
    return (out[0] + 1, *out[1:]) if isinstance(out, tuple) else out + 1


def test_swap_wrap_attach_then_restore_is_bitwise_the_model_before():
    model = tiny_llama()
    ids = torch.randint(0, 260, (2, 12))
    before, logits = snapshot(model), model(input_ids=ids).logits
    for name, module, _ in surgery.select_modules(model, kinds=["linear"], layers=[0]):
        surgery.swap_class(module, Doubled, "a", "Doubled")
        surgery.attach(module, "a", "scale_buffer", torch.nn.Identity())
        surgery.attach(module, "a", "note", name)
    for _, layer in surgery.select_layers(model, [1]):
        surgery.wrap_forward(layer, "b", _plus_one)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "DoubledLinear" and surgery.original_class(q) is torch.nn.Linear
    assert surgery.kind(q) == "linear" and surgery.owner(q) == "a" and q.note == "model.layers.0.self_attn.q_proj"
    assert "model.layers.0.self_attn.q_proj.scale_buffer" not in model.state_dict()  # Identity has no state
    assert not torch.equal(model(input_ids=ids).logits, logits)
    assert surgery.restore(model, "b") == ["model.layers.1"]
    restored = surgery.restore(model, "a")
    assert len(restored) == 7 and all(n.startswith("model.layers.0.") for n in restored)
    assert_same(before, snapshot(model))
    assert torch.equal(model(input_ids=ids).logits, logits)
    assert surgery.restore(model, "a") == []


def test_stacked_wraps_undo_in_reverse_only():
    model = tiny_llama(layers=1)
    layer = model.model.layers[0]
    surgery.wrap_forward(layer, "a", _plus_one)
    surgery.wrap_forward(layer, "b", _plus_one)
    with pytest.raises(RuntimeError, match="undo b first"):
        surgery.restore(model, "a")
    surgery.restore(model, "b")
    assert surgery.wrapped_by(layer, "a") and not surgery.wrapped_by(layer, "b")
    surgery.restore(model, "a")
    assert "forward" not in vars(layer)


def test_a_swap_under_a_later_one_stays_with_a_warning():
    model = tiny_llama(layers=1)
    q = model.model.layers[0].self_attn.q_proj
    surgery.swap_class(q, Doubled, "a", "Doubled")
    surgery.swap_class(q, Halved, "b", "Halved")
    assert surgery.owner(q) == "b" and surgery.swapped_by(q, "a") and surgery.touched(q, "a")
    with pytest.warns(UserWarning, match="undo that first"):
        surgery.restore(model, "a")
    surgery.restore(model, "b")
    surgery.restore(model, "a")
    assert type(q) is torch.nn.Linear
