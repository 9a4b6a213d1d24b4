"""Measured memory (MemTracker, exact on CPU) equals the plugin's prediction; QLoRAM < LoRAM < LoRA."""

import pytest
import torch

from memwise import MemoryEstimate, RunContext, Workload
from memwise.memory import measure_step, parameter_bytes
from memwise_loram import LoramPlugin, LoraSpec, inject_lora
from memwise.testing import tiny_llama

CATS = ("parameters", "gradients", "optimizer_state")


def tiny():
    return tiny_llama()


def full_finetune_estimate(model):
    n = sum(1 for _ in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    return MemoryEstimate(parameters=parameter_bytes(model), gradients=grads, optimizer_state=2 * grads + 4 * n)


def measure(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    return measure_step(model, opt, lambda: model(input_ids=x, labels=x).loss)


@pytest.fixture(scope="module")
def runs():
    out = {}
    lora = tiny()
    inject_lora(lora, LoraSpec(rank=4, dropout=0.0))
    out["lora"] = (None, measure(lora))
    for name, with_ in (("loram", {"ratio": 0.5, "layers": "1"}), ("qloram", {"ratio": 0.85, "nf4": True})):
        model = tiny()
        plugin = LoramPlugin(dict(with_, rank=4, dropout=0.0))
        ctx = RunContext(stage="fit", model=model, workload=Workload(2, 16))
        base = full_finetune_estimate(model)
        predicted = base.apply(plugin.memwise_estimate_memory(ctx=ctx, estimate=base))
        plugin.memwise_transform_model(ctx=ctx)
        out[name] = (predicted, measure(model))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["loram", "qloram"])
def test_measured_equals_predicted(runs, name):
    predicted, report = runs[name]
    for cat in CATS:
        assert report.after_step[cat] == getattr(predicted, cat), cat


def test_qloram_below_loram_below_lora(runs):
    lora, loram, qloram = (runs[n][1] for n in ("lora", "loram", "qloram"))
    for cat in CATS:
        assert qloram.after_step[cat] <= loram.after_step[cat] < lora.after_step[cat]
    assert qloram.after_step["parameters"] < loram.after_step["parameters"]
    assert qloram.peak_total < loram.peak_total < lora.peak_total
