"""CoatAdamW against torch.optim.AdamW: parameters, moment errors, state round trips."""

import io

import pytest
import torch
from memwise_coat import CoatAdamW
from memwise_coat.quantization import codec, dequantize_groups, expansion_exponent, quantize_groups
from memwise_coat.state import CoatState


def _pair(shape, seed=0, **coat):
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.02
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    return a, b, torch.optim.AdamW([a], **hp), CoatAdamW([b], **hp, **coat)


def _grad(shape, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(shape, generator=gen) * 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("cols", [32, 1024, 4097])
def test_parameters_follow_adamw_for_five_steps(cols):
    shape = (1024, cols)
    a, b, ref, ours = _pair(shape)
    for step in range(5):
        a.grad = _grad(shape, step)
        b.grad = a.grad.clone()
        ref.step()
        ours.step()
    assert ours.state[b]["exp_avg"].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(b.detach(), a.detach(), rtol=2e-2, atol=2e-3)


def _rel(x, y):
    return ((x - y).norm() / x.norm()).item()


def test_moment_errors_with_resynchronised_reference():
    """bitsandbytes' protocol: each step the reference restarts from our dequantized moments."""
    shape = (1024, 32)
    a, b, ref, ours = _pair(shape)
    layout = CoatState.of_group(ours.param_groups[0])
    errors = []
    for step in range(50):
        a.grad = _grad(shape, step) * (1 + step % 7)
        b.grad = a.grad.clone()
        ref.step()
        ours.step()
        st = ours.state[b]
        m, v = layout.load(st, "exp_avg"), layout.load(st, "exp_avg_sq")
        errors.append((_rel(ref.state[a]["exp_avg"], m), _rel(ref.state[a]["exp_avg_sq"], v)))
        ref.state[a]["exp_avg"].copy_(m)
        ref.state[a]["exp_avg_sq"].copy_(v)
        a.data.copy_(b.data)
    mean_m = sum(e[0] for e in errors) / len(errors)
    mean_v = sum(e[1] for e in errors) / len(errors)
    print(f"relative L2 over 50 steps: first moment mean {mean_m:.4f} max {max(e[0] for e in errors):.4f}, "
          f"second moment mean {mean_v:.4f} max {max(e[1] for e in errors):.4f}")
    assert mean_m <= 0.025 and mean_v <= 0.01, errors


def test_expansion_beats_plain_fp8_on_adam_states():
    shape = (512, 256)
    a, _, ref, _ = _pair(shape)
    for step in range(20):
        a.grad = _grad(shape, step)
        ref.step()
    for moment in ("exp_avg", "exp_avg_sq"):
        x = ref.state[a][moment]
        errs = {}
        for expansion in (True, False):
            c = codec(expansion=expansion)
            packed = quantize_groups(x, c)
            errs[expansion] = _rel(x, dequantize_groups(packed["q"], packed, c))
        assert errs[True] < errs[False], (moment, errs)


def test_expansion_exponent_and_centre():
    c = codec()
    x = torch.linspace(1, 4, 128)
    packed = quantize_groups(x, c)
    assert packed["expand"].item() == 8.25
    assert packed["centre"].item() == 2.0
    assert expansion_exponent(torch.tensor([4.0]), c.log_range).item() == 8.25


@pytest.mark.parametrize("expansion", [True, False])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_zero_and_constant_groups_round_trip_exactly(expansion, fmt):
    c = codec(fmt, expansion=expansion)
    x = torch.cat([torch.zeros(128), torch.full((128,), -0.37), torch.tensor([0.0, 5e-3, 0.0, -5e-3] * 32),
                   torch.full((70,), 3e-9)])
    packed = quantize_groups(x, c)
    assert torch.equal(dequantize_groups(packed["q"], packed, c), x)


def test_zeros_do_not_collapse_expansion_and_k_follows_the_paper_below_one():
    c = codec()
    x = torch.linspace(1, 4, 128)
    with_zeros = x.clone()
    with_zeros[1:-1:3] = 0  # keeps the extremes 1 and 4
    k = quantize_groups(with_zeros, c)["expand"].item()
    assert k == 8.25
    wide = torch.logspace(-12, 0, 128)  # log2 R = 39.86: k = floor(16.61 / 39.86 * 16) / 16 = 6/16
    assert quantize_groups(wide, c)["expand"].item() == 0.375
    assert quantize_groups(wide, codec(min_expansion=1.0))["expand"].item() == 1.0
    huge = torch.tensor([1e-38, 1e38] * 64)  # log2 R = 252.5: the formula gives 1/16, the floor holds it there
    assert quantize_groups(huge, c)["expand"].item() == 0.0625
    assert expansion_exponent(torch.tensor([2.0 ** 300]), c.log_range).item() == 0.0625  # formula: 0


def _heavy_tailed_states(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(n, generator=gen)
    u = torch.rand(n, generator=gen)
    return {"squared_gaussian": g.square() * 1e-6,  # a second moment of Gaussian gradients
            "cauchy": torch.tan(torch.pi * (u - 0.5)) * 1e-3}  # a heavy-tailed first moment


@pytest.mark.parametrize("kind", ["squared_gaussian", "cauchy"])
def test_wide_range_states_follow_the_paper(kind):
    """Round trip of 64 groups: k < 1 on wide groups keeps every value within 30% (k >= 1: up to hundreds of times off)."""
    x = _heavy_tailed_states(64 * 128)[kind]
    packed = quantize_groups(x, codec())
    worst = ((dequantize_groups(packed["q"], packed, codec()) - x).abs() / x.abs()).max().item()
    assert (packed["expand"] < 1).any()
    assert worst < 0.3, worst


def test_heavy_tailed_gradients_stay_close_to_fp32_adamw():
    """10 AdamW steps on Student-t gradients: the largest parameter gap to fp32 AdamW stays below 1e-3
    (with k floored at 1 it reached 5.0e-3; 1e-3 is one learning-rate step)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(256, 256, generator=gen) * 0.02
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ref, ours = torch.optim.AdamW([a], lr=1e-3), CoatAdamW([b], lr=1e-3)
    tail = torch.distributions.StudentT(1.5)
    torch.manual_seed(5)
    for _ in range(10):
        a.grad = torch.randn(256, 256, generator=gen) * tail.sample((256, 256)).abs() * 1e-2
        b.grad = a.grad.clone()
        ref.step()
        ours.step()
    gap = (a - b).abs().max().item()
    assert gap < 1e-3, gap


def test_small_tensors_and_excluded_parameters_stay_fp32_and_match_adamw():
    torch.manual_seed(0)
    small = torch.nn.Parameter(torch.randn(64, 32))
    emb = torch.nn.Parameter(torch.randn(260, 64))
    big = torch.nn.Parameter(torch.randn(128, 64))
    ref_params = [torch.nn.Parameter(t.detach().clone()) for t in (small, emb)]
    ours = CoatAdamW([small, emb, big], fp32_params=[emb])
    ref = torch.optim.AdamW(ref_params)
    for step in range(3):
        for p, r in zip((small, emb), ref_params):
            p.grad = torch.randn_like(p)
            r.grad = p.grad.clone()
        big.grad = torch.randn_like(big)
        ours.step()
        ref.step()
    assert ours.state[small]["exp_avg"].dtype == torch.float32
    assert ours.state[emb]["exp_avg"].dtype == torch.float32
    assert ours.state[big]["exp_avg"].dtype == torch.float8_e4m3fn
    assert torch.equal(small, ref_params[0]) and torch.equal(emb, ref_params[1])


def test_a_large_fp32_parameter_steps_as_adamw_in_chunks_of_bounded_workspace():
    """An embedding kept in fp32 is updated CHUNK elements at a time: bitwise torch AdamW's step,
    with the two temporaries of one chunk (update.step_workspace_bytes) instead of two of its size."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from memwise_coat.update import CHUNK, step_workspace_bytes

    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(2 * CHUNK // 64 + 3, 64))  # two chunks and a 192-element tail
    ref = torch.nn.Parameter(emb.detach().clone())
    ours, theirs = CoatAdamW([emb], fp32_params=[emb], weight_decay=0.1), torch.optim.AdamW([ref], weight_decay=0.1)
    for step in range(3):
        emb.grad = torch.randn_like(emb)
        ref.grad = emb.grad.clone()
        theirs.step()
        if step < 2:
            ours.step()
            continue
        tracker = MemTracker()
        tracker.track_external(emb, ours)
        with tracker:
            ours.step()
            after = tracker.get_tracker_snapshot("current")  # parameter, gradient and state, as before
        peak = tracker.get_tracker_snapshot("peak")
    assert torch.equal(emb, ref)
    assert torch.equal(ours.state[emb]["exp_avg_sq"], theirs.state[ref]["exp_avg_sq"])
    workspace = sum(d["Total"] for d in peak.values()) - sum(d["Total"] for d in after.values())
    assert workspace == step_workspace_bytes([emb.numel()]) == 2 * 4 * CHUNK


def test_e5m2_second_moment_and_plain_mode():
    shape = (256, 64)
    for opts, keys in (({"second_moment_format": "e5m2"}, 4), ({"expansion": False}, 2)):
        a, b, ref, ours = _pair(shape, **opts)
        for step in range(5):
            a.grad = _grad(shape, step)
            b.grad = a.grad.clone()
            ref.step()
            ours.step()
        torch.testing.assert_close(b.detach(), a.detach(), rtol=2e-2, atol=2e-3)
        st = ours.state[b]
        assert len([k for k in st if k.startswith("exp_avg_sq")]) == keys
        if "second_moment_format" in opts:
            assert st["exp_avg_sq"].dtype == torch.float8_e5m2


def _train(opt, p, steps, start=0):
    for step in range(start, start + steps):
        p.grad = _grad(p.shape, step)
        opt.step()


def test_save_load_weights_only_continue_identically():
    shape = (128, 96)
    _, b, _, ours = _pair(shape)
    _, c, _, resumed = _pair(shape)
    _train(ours, b, 3)
    buf = io.BytesIO()
    torch.save({"optimizer": ours.state_dict(), "param": b.detach().clone()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    c.data.copy_(saved["param"])
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.state[c]["exp_avg"].dtype == torch.float8_e4m3fn
    _train(ours, b, 4, start=3)
    _train(resumed, c, 4, start=3)
    assert torch.equal(b, c)


def test_torch_adamw_conversion_both_ways():
    shape = (128, 96)
    _, b, _, ours = _pair(shape)
    _train(ours, b, 3)
    plain = ours.to_torch_adamw_state_dict()
    p = torch.nn.Parameter(b.detach().clone())
    ref = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01)
    ref.load_state_dict(plain)
    assert ref.state[p]["exp_avg"].dtype == torch.float32
    layout = CoatState.of_group(ours.param_groups[0])
    assert torch.equal(ref.state[p]["exp_avg"], layout.load(ours.state[b], "exp_avg"))
    _train(ours, b, 3, start=3)
    _train(ref, p, 3, start=3)
    torch.testing.assert_close(b.detach(), p.detach(), rtol=2e-2, atol=2e-3)
    back = CoatAdamW.from_torch(ref)
    assert back.state[p]["exp_avg"].dtype == torch.float8_e4m3fn
    assert back.param_groups[0]["lr"] == 1e-3


def test_from_torch_rejects_amsgrad():
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="amsgrad"):
        CoatAdamW.from_torch(torch.optim.AdamW([p], amsgrad=True))
