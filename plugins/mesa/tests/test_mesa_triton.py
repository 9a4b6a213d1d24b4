"""Triton quantize/dequantize kernels against the torch reference, under TRITON_INTERPRET=1.

Run in a subprocess: the interpreter flag must be set before triton is imported.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import torch
from memwise.kernels.dispatch import use_triton
from memwise_mesa.kernels import reference, triton_quant
from memwise_mesa.quantizer import RangeQuantizer, unpack

torch.manual_seed(0)
x = torch.randn(3, 4, 10, 16) * torch.tensor([0.1, 1.0, 5.0, 50.0]).view(1, 4, 1, 1)
assert use_triton(x)
for layout, groups in (("head", 4), ("channel", 4)):
    q = RangeQuantizer(layout, groups)
    q.observe(x)
    x_in = x * 1.3  # wider than the range: saturation must agree too
    alpha = q.alpha.clamp_min(1e-8)
    inner = x.numel() // x.shape[0] // groups if layout == "head" else 16 // groups
    args = (x_in.contiguous(), 255 / alpha, q.beta, groups, inner, 255)
    ref = reference.quantize(*args, stochastic=False)
    got = triton_quant.quantize(*args, stochastic=False)
    assert torch.equal(ref, got), (layout, (ref.int() - got.int()).abs().max())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        r = reference.dequantize(ref, alpha / 255, q.beta, groups, inner, dtype)
        t = triton_quant.dequantize(ref, alpha / 255, q.beta, groups, inner, dtype)
        tol = float(alpha.max()) * 1e-6 + (0 if dtype == torch.float32 else 1e-2 * float(r.abs().max()))
        assert t.dtype == dtype and torch.allclose(r.float(), t.float(), rtol=0, atol=tol), dtype
    s = triton_quant.quantize(*args, stochastic=True)
    assert ((s.int() - ref.int()).abs() <= 1).all()
    # stochastic codes average to the exact scaled value inside the range (unbiased)
    xs = (x * 0.5).contiguous()
    inv = 255 / alpha
    mean = sum(triton_quant.quantize(xs, inv, q.beta, groups, inner, 255, True).float() for _ in range(200)) / 200
    exact = ((xs.reshape(-1, groups, inner) - q.beta.view(1, -1, 1)) * inv.view(1, -1, 1)).clamp(0, 255)
    assert (mean.reshape(exact.shape) - exact).abs().max() < 0.15
    print(layout, "ok")
# end to end: the dispatcher routes a RangeQuantizer through triton and matches the reference within one step
q = RangeQuantizer("channel", 4, stochastic=False)
p = q.pack(x)
back = unpack(p)
assert ((back - x).abs() <= (q.alpha / 255).repeat_interleave(4).max() * 0.5 + 1e-5).all()
# head_channel: groups of one element, packed in [B, N, H, D] order, through the dispatcher
hc = RangeQuantizer("head_channel", 4 * 16, stochastic=False)
xt = x.transpose(1, 2).contiguous().transpose(1, 2)
back = unpack(hc.pack(xt))
assert back.shape == xt.shape
assert ((back - xt).abs() <= (hc.alpha / 255).view(4, 16)[None, :, None, :] * 0.5 + 1e-5).all()
print("done")
'''


@pytest.mark.slow
def test_triton_kernels_match_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done" in res.stdout
