"""The FP8 state codec against its formulas written plainly: codes, metadata and values bit for bit."""

import math

import pytest
import torch
from memwise.kernels.fp8 import round_to_grid
from memwise_coat.quantization import codec, dequantize_groups, expansion_exponent, quantize_groups


def _plain_quantize(x, c):
    flat = x.reshape(-1).float()
    g = torch.nn.functional.pad(flat, (0, (-flat.numel()) % c.group_size)).view(-1, c.group_size)
    a = g.abs()
    big = a.amax(dim=1)
    small = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(dim=1)
    nonzero, flat_group, one = big > 0, small == big, torch.ones_like(big)
    if c.expansion:
        k = torch.where(nonzero, expansion_exponent(big / small, c.log_range, c.min_expansion), one)
        centre = torch.where(nonzero, torch.where(flat_group, big, torch.sqrt(big) * torch.sqrt(small)), one)
        y = torch.sign(g) * torch.exp2(k[:, None] * torch.log2(a / centre[:, None]))
        scale = torch.where(nonzero & ~flat_group, y.abs().amax(dim=1) / c.fmt.max_value, one)
        meta = {"scale": scale, "expand": k, "centre": centre}
    else:
        y = g
        scale = torch.where(nonzero, torch.where(flat_group, big, big / c.fmt.max_value), one)
        meta = {"scale": scale}
    r = y / scale[:, None]
    r = torch.where(r == 0, r, torch.copysign(r.abs().clamp(min=c.smallest), r))
    meta["q"] = round_to_grid(r, c.fmt).to(c.fmt.dtype).view(-1)[: x.numel()].view(x.shape)
    return meta


def _plain_dequantize(q, meta, c):
    flat = q.reshape(-1).float()
    g = torch.nn.functional.pad(flat, (0, (-flat.numel()) % c.group_size)).view(-1, c.group_size)
    ys = g * meta["scale"][:, None]
    if c.expansion:
        ys = torch.sign(ys) * torch.exp2(torch.log2(ys.abs()) / meta["expand"][:, None]) * meta["centre"][:, None]
    return ys.view(-1)[: q.numel()].view(q.shape)


def _inputs(n):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(n, generator=gen)
    u = torch.rand(n, generator=gen)
    sparse = g * 1e-3
    sparse[::3] = 0
    sparse[5::7] = -0.0
    return {"gaussian": g * 1e-3, "squared_gaussian": g.square() * 1e-6,
            "cauchy": torch.tan(torch.pi * (u - 0.5)) * 1e-3, "zeros_and_signed_zeros": sparse,
            "log_spaced": torch.logspace(-30, 0, n) * torch.sign(g), "extremes": torch.tensor([1e-38, 1e38] * (n // 2)),
            "huge_constant": torch.full((n,), 3e37)}


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("expansion", [True, False])
@pytest.mark.parametrize("group_size", [128, 48])
def test_codec_equals_plain_formulas_bit_for_bit(fmt, expansion, group_size):
    c = codec(fmt, group_size, expansion)
    for name, x in _inputs(128 * 12 + 37).items():
        ours, plain = quantize_groups(x, c), _plain_quantize(x, c)
        assert ours.keys() == plain.keys()
        for key in plain:
            same = torch.equal(_bits(ours[key]), _bits(plain[key])) or (
                key != "q" and bool(((ours[key] == plain[key]) | (ours[key].isnan() & plain[key].isnan())).all()))
            assert same, (name, key)
        values = dequantize_groups(ours["q"], ours, c)
        assert torch.equal(_bits(values), _bits(_plain_dequantize(plain["q"], plain, c))), name
        out = torch.empty(x.shape, dtype=c.fmt.dtype)
        assert quantize_groups(x, c, out=out)["q"] is out and torch.equal(_bits(out), _bits(ours["q"])), name
