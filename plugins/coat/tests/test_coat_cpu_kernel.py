"""The fused C++ CoatAdamW step on CPU against the torch reference (update.fp8_step_reference).

Each step both paths start from the same parameter and state (the reference's trajectory), so every
difference is the kernel's own. Its log2/exp2 are polynomials (encoding's shorter, as its result is
rounded onto FP8), it decodes most groups through a table of 2^(log2|code| / k) per k, and it encodes
with the group's scale folded into the exponent, so a code may differ from the reference's by one FP8
step at a rounding boundary: measured here at most 1.3e-5 of a moment's codes in one step with float32
parameters and 3.2e-4 with bfloat16 ones (their gradients repeat values, so more moments sit on a
boundary; the torch-only polynomials of the previous kernel gave 2.5e-4). Parameters differ by one
float32 rounding in about 7% of elements: torch's vectorised sqrt is not correctly rounded, and the
reference rounds the exponent 2^((log2|code| + log2 s) / k) before the exp2 where the table does not.
The WIDE and NARROW groups have k below 1/4 and above 64, outside the tables: they take the exp2
path, the other groups the table path.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from memwise_coat import CoatAdamW, optimizer
from memwise_coat.kernels import cpu_step
from memwise_coat.quantization import dequantize_groups
from memwise_coat.scalars import StepScalars
from memwise_coat.state import MOMENTS, CoatState
from memwise_coat.update import fp8_step, fp8_step_reference

SHAPE = (300, 250)  # 75000 elements: the last group of 128 holds 120
ZERO, CONSTANT = slice(0, 128), slice(256, 384)  # a group whose gradients are 0, one whose are one value
# groups whose expansion k falls outside the kernel's power tables (k < 1/4 and k >= 64), so that their
# moments are decoded by an exp2 per element, as the groups of ordinary k are not
WIDE, NARROW = slice(512, 640), slice(768, 896)


@pytest.fixture(scope="module")
def ext():
    built = cpu_step.extension()
    if built is None:
        pytest.skip("the CPU CoatAdamW kernel cannot be built here (no C++ compiler or ninja)")
    return built


def _grad(step: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    g = (torch.randn(SHAPE, generator=gen) * torch.logspace(-4, -1, SHAPE[1])).view(-1)
    g[ZERO] = 0.0
    g[CONSTANT] = 3e-3 * (step + 1)
    g[WIDE] = torch.logspace(-22, -1, 128) * (-1) ** torch.arange(128)
    g[NARROW] = 2e-2 * (1 + 0.05 * torch.arange(128) / 128)
    return g.view(SHAPE).to(dtype)


def _neighbours(codes: torch.Tensor, meta: dict, c) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitudes of the codes one FP8 step below and above each code, decoded with ``meta``."""
    raw = codes.view(torch.uint8).int()
    sign, mag = raw & 0x80, raw & 0x7F
    top = int(torch.tensor(c.fmt.max_value).to(c.fmt.dtype).view(torch.uint8))
    bounds = []
    for bumped in ((mag - 1).clamp(min=0), (mag + 1).clamp(max=top)):
        q = (sign | bumped).to(torch.uint8).view(c.fmt.dtype)
        bounds.append(dequantize_groups(q, meta, c).abs())
    return bounds[0], bounds[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("expansion", [True, False], ids=["expansion", "plain"])
@pytest.mark.parametrize("second_format", ["e4m3", "e5m2"])
def test_kernel_step_equals_the_reference(ext, dtype, expansion, second_format):
    torch.manual_seed(0)
    p = torch.nn.Parameter((torch.randn(SHAPE) * 0.02).to(dtype))
    opt = CoatAdamW([p], min_numel=0, second_moment_format=second_format, expansion=expansion)
    first, second = opt.codecs(opt.param_groups[0])
    state = opt._init_state(p, opt.param_groups[0])
    layout = CoatState(first, second)
    calls = []
    for step in range(1, 5):
        s = StepScalars(1e-3, 0.9, 0.999, 1e-8, 0.01, float(step))
        grad = _grad(step, dtype)
        kernel_p, kernel_state = p.detach().clone(), {k: v.clone() for k, v in state.items()}
        cpu_step.fp8_step_cpu(kernel_p, grad, kernel_state, s, first, second, ext)
        calls.append(step)
        fp8_step_reference(p.detach(), grad, state, s, first, second)

        if dtype == torch.float32:  # one rounding of the update apart at most
            ordinary = torch.ones(SHAPE, dtype=torch.bool).view(-1)
            ordinary[WIDE] = False
            got, want = kernel_p.view(-1), p.detach().view(-1)
            torch.testing.assert_close(got[ordinary], want[ordinary], rtol=2.4e-7, atol=1e-9)
            # k = 1/16 multiplies the exponent (log2|code| + log2 s) / k up to about 150: one float32
            # rounding of it moves the decoded moment by up to 2^-24 * 150 * ln 2 = 6e-6 of itself
            torch.testing.assert_close(got[WIDE], want[WIDE], rtol=2e-6, atol=1e-9)
        else:  # a bfloat16 rounding boundary, rarely
            differ = kernel_p != p.detach()
            assert differ.float().mean() <= 1e-3
            torch.testing.assert_close(kernel_p, p.detach(), rtol=2**-7, atol=0)  # one bfloat16 step
        for moment, c in zip(MOMENTS, (first, second)):
            ours, ref = kernel_state[moment], state[moment]
            assert (ours.view(torch.uint8) != ref.view(torch.uint8)).float().mean() <= 5e-4, moment
            if expansion:
                assert torch.equal(layout.metadata(kernel_state, moment)["expand"],
                                   layout.metadata(state, moment)["expand"]), moment
            # each decoded value lies within one FP8 step of the reference's code
            got = layout.load(kernel_state, moment).abs().view(-1)
            below, above = _neighbours(ref, layout.metadata(state, moment), c)
            assert (got >= below.view(-1) * (1 - 1e-5)).all() and (got <= above.view(-1) * (1 + 1e-5)).all(), moment
            # a group of zeros stays zero and a constant group exact, on both paths
            assert torch.equal(layout.load(kernel_state, moment).view(-1)[ZERO], torch.zeros(128))
            want = layout.load(state, moment).view(-1)[CONSTANT]
            assert torch.equal(layout.load(kernel_state, moment).view(-1)[CONSTANT], want)
            assert torch.equal(want, want[:1].expand(128)) and bool(want[0] > 0)
    assert len(calls) == 4


def test_coat_adamw_steps_through_the_kernel_on_cpu(ext, monkeypatch):
    calls = []
    real = cpu_step.fp8_step_cpu
    monkeypatch.setattr(cpu_step, "fp8_step_cpu", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 130) * 0.02), torch.nn.Parameter(torch.randn(32, 64))]
    opt = CoatAdamW(params)  # the small one keeps fp32 moments
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert calls == [torch.Size([256, 130])] * 3
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32


def test_a_kernel_that_cannot_be_built_warns_once_and_steps_with_the_reference(no_cpu_compiler, monkeypatch):
    with pytest.warns(UserWarning, match="CoatAdamW kernel could not be built .*no C\\+\\+ compiler found.*reference"):
        assert cpu_step.extension() is None
    runs = []
    for path in ("auto", "reference"):
        if path == "reference":
            monkeypatch.setattr(optimizer, "fp8_step", functools.partial(fp8_step, use_kernel=False))
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(200, 70) * 0.02)
        opt = CoatAdamW([p], min_numel=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # tried once per process
            for _ in range(2):
                p.grad = torch.randn_like(p)
                opt.step()
        runs.append((p, opt.state[p]))
    (a, got), (b, want) = runs
    assert torch.equal(a, b)
    for key, value in want.items():
        assert torch.equal(_bits(got[key]), _bits(value)), key


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t
