"""The 8-bit range quantizer (torch reference): error bounds, saturation, unbiasedness, ranges."""

import torch

from memwise_mesa.quantizer import RangeQuantizer, pack_with_range, unpack


def test_error_within_one_step_and_half_step_when_rounding_to_nearest():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 64) * torch.linspace(0.1, 5, 64)
    for stochastic, bound in ((True, 1.0), (False, 0.5)):
        q = RangeQuantizer("channel", 8, stochastic=stochastic)
        p = q.pack(x)
        step = (q.alpha / 255).repeat_interleave(8)
        err = (unpack(p) - x).abs() / step
        assert err.max() <= bound + 1e-4
        assert p.payload.dtype == torch.uint8 and p.nbytes() == x.numel() + 2 * 4 * 8


def test_first_batch_min_max_then_running_average():
    q = RangeQuantizer("channel", 2, decay=0.9)
    a = torch.tensor([[0.0, 1.0, 10.0, 20.0]])
    q.observe(a)
    assert torch.equal(q.alpha, torch.tensor([1.0, 10.0])) and torch.equal(q.beta, torch.tensor([0.0, 10.0]))
    q.observe(torch.tensor([[-1.0, 3.0, 10.0, 30.0]]))
    torch.testing.assert_close(q.alpha, torch.tensor([0.9 * 1 + 0.1 * 4, 0.9 * 10 + 0.1 * 20]))
    torch.testing.assert_close(q.beta, torch.tensor([0.9 * 0 + 0.1 * -1, 10.0]))
    assert int(q.steps) == 2


def test_batch_wider_than_running_range_saturates_instead_of_wrapping():
    torch.manual_seed(0)
    q = RangeQuantizer("channel", 1)
    q.observe(torch.rand(4, 32))  # range about [0, 1]
    x = torch.tensor([[-5.0, 0.5, 1.5, 100.0]])
    p = q.pack(x)  # the running range moves only by 10% of the way: 100 lies far outside it
    assert float(q.alpha[0] + q.beta[0]) < 12 and float(q.beta[0]) > -1
    assert (100 - q.beta[0]) / q.alpha[0] * 255 > 2000  # unclamped, this code would wrap around a byte
    assert p.payload[0, 0] == 0 and p.payload[0, 3] == 255
    back = unpack(p)
    torch.testing.assert_close(back[0, 3], q.alpha[0] + q.beta[0])
    torch.testing.assert_close(back[0, 0], q.beta[0])


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.rand(1, 64) * 3
    q = RangeQuantizer("channel", 1)
    q.observe(torch.tensor([[0.0, 3.0]]))

    total = torch.zeros_like(x)
    n = 4000
    for _ in range(n):
        total += unpack(pack_with_range(x, q.alpha, q.beta, "channel", 1, stochastic=True))
    step = 3.0 / 255
    # standard error of the mean of n Bernoulli roundings is at most step / (2 sqrt(n))
    assert ((total / n) - x).abs().max() < 5 * step / (2 * n**0.5)
    nearest = unpack(pack_with_range(x, q.alpha, q.beta, "channel", 1, stochastic=False))
    assert ((total / n) - x).abs().mean() < (nearest - x).abs().mean()


def test_head_ranges_differ_across_heads_with_different_scales():
    torch.manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 10.0, 100.0]).view(1, 4, 1, 1)
    x = torch.randn(2, 4, 16, 8) * scales
    q = RangeQuantizer("head", 4)
    p = q.pack(x)
    ratio = q.alpha / q.alpha[0]
    assert torch.all(ratio[1:] / ratio[:-1] > 5)
    rel = (unpack(p) - x).abs().amax(dim=(0, 2, 3)) / scales.flatten()
    assert rel.max() / rel.min() < 3  # each head keeps its own relative precision


def test_head_channel_ranges_follow_each_head_and_channel():
    torch.manual_seed(0)
    # q from a projection: [B, N, H, D] in memory, seen as [B, H, N, D]; channels of very different scales
    channel_scale = torch.logspace(-2, 1, 8)
    x = (torch.randn(2, 16, 4, 8) * channel_scale).transpose(1, 2)
    q = RangeQuantizer("head_channel", 4 * 8, stochastic=False)
    p = q.pack(x)
    assert q.alpha.shape == (32,) and p.shape == x.shape and p.payload.is_contiguous()
    back = unpack(p)
    assert back.shape == x.shape
    err = (back - x).abs().amax(dim=(0, 2))  # [H, D]
    assert (err <= q.alpha.view(4, 8) / 255 * 0.5 + 1e-6).all()
    # one range per head does far worse on the small channels
    per_head = unpack(RangeQuantizer("head", 4, stochastic=False).pack(x))
    small = slice(0, 3)
    assert (per_head - x)[..., small].abs().mean() > 10 * (back - x)[..., small].abs().mean()


def test_half_precision_inputs_round_trip_in_their_dtype():
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(4, 8, 32).to(dtype)
        q = RangeQuantizer("channel", 4)
        back = unpack(q.pack(x))
        assert back.dtype == dtype
        step = float(q.alpha.max()) / 255
        assert (back.float() - x.float()).abs().max() <= step * 1.05


def test_lazy_quantizer_is_sized_on_first_use_and_on_load():
    q = RangeQuantizer("channel", None, wanted_groups=8)
    assert q.groups == 0
    q.pack(torch.randn(3, 12))
    assert q.groups == 6  # the largest divisor of 12 not above 8
    fresh = RangeQuantizer("channel", None, wanted_groups=8)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.alpha, q.alpha) and int(fresh.steps) == 1
