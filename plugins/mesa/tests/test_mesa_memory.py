"""Measured activation bytes (exact on CPU with MemTracker via ``measure_step``).

Two figures per model: ``after_forward["activations"]``, the bytes saved for backward
(what backward will read), must fall to at most 0.27x of fp32 and 0.55x of bf16; and
``category_max["activations"]``, which also counts the transient full-precision tensors
of the layer being computed in forward, falls too (bounds measured on 4 layers).
"""

import copy

import pytest
import torch

from memwise.memory import measure_step
from memwise_mesa import apply_mesa
from memwise.testing import tiny_llama


def decoder(dtype: torch.dtype, layers: int = 4) -> torch.nn.Module:
    return tiny_llama(hidden=128, layers=layers, inter=344, use_cache=False).model.to(dtype)


@pytest.mark.slow
def test_activation_bytes_of_converted_layers_fall_to_a_quarter_of_fp32_and_half_of_bf16():
    torch.manual_seed(1)
    x = torch.randint(0, 260, (4, 128))
    for dtype, saved_bound, peak_bound in ((torch.float32, 0.27, 0.40), (torch.bfloat16, 0.55, 0.55)):
        base = decoder(dtype)
        mesa = copy.deepcopy(base)
        apply_mesa(mesa)
        reports = []
        for model in (base, mesa):
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            reports.append(measure_step(model, opt, lambda m=model: m(input_ids=x).last_hidden_state.float().sum()))
        # the decoder's output hidden state (and its fp32 copy for the loss) is alive in both: count what layers save
        output = x.numel() * 128 * (dtype.itemsize + (4 if dtype != torch.float32 else 0))
        b, m = (r.after_forward["activations"] - output for r in reports)
        assert m <= saved_bound * b, (dtype, m, b, m / b)
        pb, pm = (r.category_max["activations"] for r in reports)
        assert pm <= peak_bound * pb, (dtype, pm, pb, pm / pb)
