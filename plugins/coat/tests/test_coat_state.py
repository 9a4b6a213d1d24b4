"""CoatState: the one owner of a CoatAdamW parameter's state layout."""

import pytest
import torch
from memwise_coat import CoatAdamW
from memwise_coat.quantization import dequantize_groups, quantize_groups
from memwise_coat.state import CoatState, is_quantized

GROUP = {"group_size": 128, "expansion": True, "second_moment_format": "e5m2", "min_expansion": 1 / 16}


def _moments(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=gen) * 1e-3
    return {"step": torch.tensor(7.0), "exp_avg": m, "exp_avg_sq": m.square() + 1e-9}


def test_layout_keeps_the_keys_checkpoints_hold():
    layout = CoatState.of_group(GROUP)
    state = layout.create(torch.zeros(10, 30), quantize=True)
    assert sorted(state) == sorted(["step", "exp_avg", "exp_avg_scale", "exp_avg_expand", "exp_avg_centre",
                                    "exp_avg_sq", "exp_avg_sq_scale", "exp_avg_sq_expand", "exp_avg_sq_centre"])
    assert state["exp_avg"].dtype == torch.float8_e4m3fn and state["exp_avg_sq"].dtype == torch.float8_e5m2
    assert state["exp_avg"].shape == (10, 30) and state["exp_avg_scale"].shape == (3,)  # 300 elements: 3 groups
    plain = CoatState.of_group({**GROUP, "expansion": False}).create(torch.zeros(10, 30), quantize=True)
    assert sorted(plain) == ["exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale", "step"]


def test_quantized_or_not():
    layout = CoatState.of_group(GROUP)
    p = torch.zeros(8, 16)
    assert is_quantized(layout.create(p, quantize=True))
    fp32 = layout.create(p, quantize=False)
    assert not is_quantized(fp32) and sorted(fp32) == ["exp_avg", "exp_avg_sq", "step"]
    assert fp32["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("expansion", [True, False])
def test_round_trip_with_torch_adamw_moments(expansion):
    layout = CoatState.of_group({**GROUP, "expansion": expansion})
    p = torch.zeros(37, 50)  # a partial last group
    entry = _moments(p.shape)
    state = layout.from_adamw(entry, p, quantize=True)
    assert is_quantized(state) and state["step"].item() == 7.0
    back = layout.to_adamw(state)
    assert sorted(back) == ["exp_avg", "exp_avg_sq", "step"]
    for moment, c in (("exp_avg", layout.first), ("exp_avg_sq", layout.second)):
        packed = quantize_groups(entry[moment], c)  # the codec on its own: the same values
        assert torch.equal(back[moment], dequantize_groups(packed["q"], packed, c))
        assert torch.equal(back[moment], layout.load(state, moment))
        rel = ((back[moment] - entry[moment]).norm() / entry[moment].norm()).item()
        assert rel < 0.1, (moment, rel)
    kept = layout.from_adamw(entry, p, quantize=False)
    assert torch.equal(kept["exp_avg"], entry["exp_avg"]) and kept["exp_avg"] is not entry["exp_avg"]
    assert torch.equal(layout.to_adamw(kept)["exp_avg_sq"], entry["exp_avg_sq"])


def test_amsgrad_state_is_refused():
    entry = {**_moments((4, 4)), "max_exp_avg_sq": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="amsgrad"):
        CoatState.of_group(GROUP).from_adamw(entry, torch.zeros(4, 4), quantize=True)


def test_slices_are_views_that_store_into_the_state():
    layout = CoatState.of_group(GROUP)
    p = torch.zeros(5, 100)  # 4 groups, the last one partial
    state = layout.from_adamw(_moments(p.shape), p, quantize=True)
    whole = layout.load(state, "exp_avg").view(-1)
    sub = layout.slice(state, 256, 500)
    assert sub["exp_avg"].numel() == 244 and sub["exp_avg_scale"].numel() == 2
    assert torch.equal(layout.load(sub, "exp_avg"), whole[256:500])  # groups are independent
    layout.store(sub, "exp_avg", torch.full((244,), 0.25))
    after = layout.load(state, "exp_avg").view(-1)
    assert torch.equal(after[256:], torch.full((244,), 0.25)) and torch.equal(after[:256], whole[:256])


def test_local_of_a_plain_state_is_itself_and_bytes_match_the_stored_tensors():
    layout = CoatState.of_group(GROUP)
    p = torch.zeros(37, 50)
    state = layout.create(p, quantize=True)
    local = layout.local(state)
    assert all(local[k] is state[k] for k in state)
    stored = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
    assert layout.nbytes(p.numel()) == stored


def test_optimizer_state_goes_through_the_layout():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = CoatAdamW([p], min_numel=0, second_moment_format="e5m2")
    p.grad = torch.randn_like(p)
    opt.step()
    layout = CoatState(*CoatAdamW.codecs(opt.param_groups[0]))
    assert sorted(opt.state[p]) == sorted(layout.create(p, quantize=True))
    m = layout.load(opt.state[p], "exp_avg")
    rel = ((m - 0.1 * p.grad).norm() / (0.1 * p.grad).norm()).item()  # one step: m = (1 - beta1) g
    assert rel < 0.03, rel
