"""Memory accounting: predictions against MemTracker measurements on the reference workloads."""

from __future__ import annotations

import pytest

from memwise.runner import measure_recipe
from memwise.testing import tiny_llama

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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("hidden, tied", [(64, False), (64, True), (256, False), (256, True)])
def test_baseline_temporaries_within_5_percent_at_32k_vocab(hidden, tied, precision):
    """The logits' gradients dominate at hidden 64, the head's or the tied embedding's at 256."""
    import torch


    from memwise.memory import measure_step, predict_baseline

    batch, seq = (4, 64) if hidden == 64 else (1, 64)
    model = tiny_llama(hidden=hidden, vocab=32768, tie_word_embeddings=tied)
    ids = torch.randint(0, 260, (batch, seq))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed" else None
    report = measure_step(model, optimizer, lambda: model(input_ids=ids, labels=ids).loss,
                          **({"context": autocast} if autocast else {}))
    predicted = predict_baseline(model, 0, batch, seq, precision).temporaries
    measured = report.category_max["temporaries"]
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
