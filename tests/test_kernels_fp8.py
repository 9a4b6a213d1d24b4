"""FP8 grid rounding: the torch reference against torch's own casts, the triton helper against both."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from memwise.kernels.fp8 import E4M3, E5M2, decode, quantize, round_to_grid


def samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * torch.logspace(-10, 5, 20000)
    specials = torch.tensor([0.0, -0.0, 31.8, -31.8, 15.9, 448.0, 464.0, 1e-9, -2.0 ** -9, 2.0 ** -10 * 3])
    return torch.cat([x, specials])


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_reference_matches_torch_cast_within_range(fmt):
    x = samples()
    x = x[x.abs() <= fmt.max_value]
    assert torch.equal(round_to_grid(x, fmt), x.to(fmt.dtype).float())


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_saturates_and_keeps_sign_of_zero(fmt):
    y = round_to_grid(torch.tensor([1e9, -1e9, -0.0, 0.0]), fmt)
    assert y.tolist()[:2] == [fmt.max_value, -fmt.max_value]
    assert torch.signbit(y[2]) and not torch.signbit(y[3])
    assert quantize(torch.tensor([31.8]), E4M3).float().item() == 32.0  # the interpreter's defect case
    q = quantize(torch.tensor([1e9, -1e9, -0.0, 0.0]), fmt).float()
    assert torch.equal(q, y) and torch.equal(torch.signbit(q), torch.signbit(y))


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_quantize_rounds_ties_like_the_grid(fmt):
    """Midpoints between neighbouring FP8 values (and one ulp either side) go where round_to_grid sends them."""
    grid = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1]), samples()])
    assert torch.equal(quantize(x, fmt).view(torch.uint8), round_to_grid(x, fmt).to(fmt.dtype).view(torch.uint8))


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_decode_equals_torch_conversion_for_every_code(fmt):
    q = torch.arange(256, dtype=torch.uint8).view(fmt.dtype)
    ours, torchs = decode(q), q.float()
    assert ours.dtype == torch.float32
    assert torch.equal(ours.isnan(), torchs.isnan())
    finite = ~torchs.isnan()
    assert torch.equal(ours[finite].view(torch.int32), torchs[finite].view(torch.int32))  # signed zeros too
    no_nan = q.view(torch.uint8)[finite].view(fmt.dtype)[:250].reshape(5, 50)[:, :40]
    assert torch.equal(decode(no_nan).view(torch.int32), no_nan.float().view(torch.int32))  # any shape


@pytest.mark.slow
def test_triton_helper_matches_reference_under_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from memwise.kernels import fp8_triton
        from memwise.kernels.fp8 import E4M3, E5M2, round_to_grid

        @triton.jit
        def kernel(x_ptr, y_ptr, n, MB: tl.constexpr, ME: tl.constexpr, MV: tl.constexpr, BLOCK: tl.constexpr):
            off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            m = off < n
            tl.store(y_ptr + off, fp8_triton.round_to_grid(tl.load(x_ptr + off, mask=m), MB, ME, MV), mask=m)

        g = torch.Generator().manual_seed(1)
        x = torch.randn(4096, generator=g) * torch.logspace(-10, 5, 4096)
        x = torch.cat([x, torch.tensor([0.0, -0.0, 31.8, -31.8, 1e9])])
        for fmt in (E4M3, E5M2):
            y = torch.empty_like(x)
            kernel[(triton.cdiv(x.numel(), 512),)](x, y, x.numel(), fmt.mantissa_bits, fmt.min_normal_exp,
                                                   fmt.max_value, BLOCK=512)
            ref = round_to_grid(x, fmt)
            assert torch.equal(y, ref) and torch.equal(torch.signbit(y), torch.signbit(ref)), fmt.name
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
