"""Memory accounting: predictions against MemTracker measurements on the reference workloads."""

from __future__ import annotations

import pytest

from memwise.runner import measure_recipe

EXACT = ("parameters", "gradients", "optimizer_state")
# max_documents keeps corpus building quick; shapes are those of BENCHMARKS.md
FAST = ["data.max_documents=300"]


def check_prediction(rows, report):
    predicted, measured = rows[-1][1].as_dict(), report.headline()
    for cat in EXACT:
        assert predicted[cat] == measured[cat], cat
    assert abs(predicted["activations"] - measured["activations"]) <= 0.15 * measured["activations"]
    return predicted, measured


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_tiny_prediction(precision):
    rows, report = measure_recipe("base/tiny", FAST + [f"trainer.precision={precision}"], warm=False)
    check_prediction(rows, report)


def test_probe_restores_what_it_touched(micro):
    """A probe leaves the weights as they were, so a second probe measures the very same bytes."""
    import torch

    from memwise import recipe
    from memwise.runner import Run

    run = Run(recipe.load(micro, []), "fit")
    run.build()
    run.transform()
    before = {k: v.clone() for k, v in run.ctx.model.state_dict().items()}
    first = run.probe_without_training(warm=False)
    after = run.ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    second = run.probe_without_training(warm=False)
    assert first.after_step["optimizer_state"] > 0
    for name in ("at_peak", "after_forward", "category_max", "after_step", "peak_total"):
        assert getattr(first, name) == getattr(second, name), name


@pytest.fixture(scope="module")
def small():
    return measure_recipe("base/small", FAST, warm=False)


@pytest.fixture(scope="module")
def small_checkpointed():
    return measure_recipe("base/small", FAST + ["plugins=[{use: checkpointing, with: {layers: all}}]"], warm=False)


@pytest.mark.slow
def test_small_prediction(small):
    check_prediction(*small)


@pytest.mark.slow
def test_checkpointing_cuts_small_activations_tenfold(small, small_checkpointed):
    base = small[1].headline()["activations"]
    ckpt = small_checkpointed[1].headline()["activations"]
    assert base / ckpt >= 10, (base, ckpt)
    check_prediction(*small_checkpointed)
    # recomputation is short-lived: it shows as temporaries, not as saved activations
    assert small_checkpointed[1].category_max["temporaries"] > small[1].category_max["temporaries"]
