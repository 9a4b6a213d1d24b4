"""NF4 storage: codebook, error bounds, exact bytes, NF4Linear autograd, triton kernel == reference."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from memwise_loram import NF4Linear, quantize_nf4
from memwise_loram.kernels import dequantize_reference, scales_reference
from memwise_loram.nf4 import codebook, nf4_nbytes


def test_codebook_is_the_nf4_levels():
    code = codebook()
    assert code.shape == (16,) and torch.all(code[1:] > code[:-1])
    assert code[0] == -1 and code[7] == 0 and code[15] == 1
    # 7 negative and 8 positive normal quantiles: asymmetric by one level
    assert (code < 0).sum() == 7 and (code > 0).sum() == 8
    torch.testing.assert_close(code[8], torch.tensor(0.0796), atol=1e-4, rtol=0)
    torch.testing.assert_close(code[1], torch.tensor(-0.6962), atol=1e-4, rtol=0)


def _half_gap():
    code = codebook()
    return float(((code[1:] - code[:-1]) / 2).max())


def test_error_bound_without_double_quant():
    torch.manual_seed(0)
    w = torch.randn(96, 80)
    q = quantize_nf4(w, block=64)
    back = dequantize_reference(q)
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    err = (back - w).reshape(-1, 64).abs()
    assert torch.all(err <= absmax * _half_gap() + 1e-6)
    # each block's largest magnitude is stored exactly (it maps to a level of ±1)
    flat, bflat = w.reshape(-1, 64), back.reshape(-1, 64)
    arg = flat.abs().argmax(1)
    pos = flat.gather(1, arg[:, None]) > 0
    assert torch.equal(bflat.gather(1, arg[:, None])[pos], flat.gather(1, arg[:, None])[pos])
    assert torch.equal(dequantize_reference(quantize_nf4(torch.zeros(4, 64))), torch.zeros(4, 64))


def test_error_bound_with_double_quant():
    torch.manual_seed(1)
    w = torch.randn(300, 64) * torch.rand(300, 1) * 3
    q = quantize_nf4(w, block=64, double_quant=True, dq_block=256)
    assert q.absmax.dtype == torch.int8
    a = w.reshape(-1, 64).abs().amax(1)
    a_hat = scales_reference(q)
    step = q.dq_step[torch.arange(a.numel()) // 256]
    assert torch.all((a - a_hat).abs() <= step / 2 + 1e-6)
    err = (dequantize_reference(q) - w).reshape(-1, 64).abs()
    assert torch.all(err <= (a * _half_gap() + step / 2 + 1e-5)[:, None])


@pytest.mark.parametrize("numel,double", [(64 * 300, False), (64 * 300, True), (100, False), (100, True)])
def test_bytes_are_payload_plus_scales(numel, double):
    q = quantize_nf4(torch.randn(numel), block=64, double_quant=double)
    stored = sum(t.untyped_storage().nbytes() for t in (q.payload, q.absmax, q.dq_step, q.dq_offset) if t is not None)
    assert q.nbytes() == stored == nf4_nbytes(numel, 64, double)
    if numel == 64 * 300:
        blocks = 300
        expected = numel // 2 + (blocks + 4 * 2 + 4 if double else 4 * blocks)
        assert q.nbytes() == expected


def test_nf4_linear_forward_backward_and_nothing_dequantized_is_saved():
    torch.manual_seed(2)
    lin = nn.Linear(64, 48)
    q = NF4Linear(lin, block=64, double_quant=True)
    w = q.dequantized()
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    torch.testing.assert_close(y, x @ w.t() + lin.bias, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    assert not any(t.shape == w.shape for t in saved)
    assert not any(p.requires_grad for p in q.parameters())


KERNEL_CHECK = r"""
import torch
from memwise.kernels.dispatch import use_triton
from memwise_loram.nf4 import quantize_nf4
from memwise_loram.kernels import dequantize, dequantize_reference
torch.manual_seed(0)
for shape, double, dtype in [((48, 64), False, torch.float32), ((300, 64), True, torch.float32),
                             ((7, 30), True, torch.bfloat16), ((1000,), False, torch.bfloat16)]:
    q = quantize_nf4(torch.randn(shape), block=64 if len(shape) == 2 else 32, double_quant=double)
    assert use_triton(q.payload)
    got, ref = dequantize(q, dtype), dequantize_reference(q, dtype)
    assert got.dtype == dtype and got.shape == ref.shape
    assert torch.equal(got, ref), (shape, double, (got.float() - ref.float()).abs().max())
print("kernel ok")
"""


@pytest.mark.slow
def test_triton_kernel_matches_reference_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "kernel ok" in run.stdout
