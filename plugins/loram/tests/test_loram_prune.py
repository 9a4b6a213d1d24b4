"""Structured and masking pruning: shapes, GQA coupling, identity at ratio 0, importance choice."""

import math

import pytest
import torch

from memwise_loram import IndexMap, prune
from memwise.surgery import layer_indices as parse_layers
from memwise_loram.index_map import Geometry, kept_counts
from memwise.testing import tiny_llama


def tiny(layers=2, kv=2, heads=4, inter=128):
    return tiny_llama(layers=layers, heads=heads, kv=kv, inter=inter).eval()


def ids(seed=0, b=2, length=16):
    return torch.randint(0, 260, (b, length), generator=torch.Generator().manual_seed(seed))


def test_kept_counts_follow_the_paper():
    geo = Geometry(80, 8192, 64, 8, 128, 28672)
    assert kept_counts(geo, 0.85) == (8 - math.floor(8 * 0.85), 28672 - math.ceil(28672 * 0.85)) == (2, 4300)
    assert kept_counts(geo, 0.99) == (1, 28672 - math.ceil(28672 * 0.99))  # at least one KV head
    assert parse_layers("4-77", 80) == list(range(4, 78))
    assert parse_layers("0,2-3", 4) == [0, 2, 3]
    with pytest.raises(ValueError):
        parse_layers("5", 4)


@pytest.mark.parametrize("method", ["l2", "random", "taylor"])
def test_structured_shapes_and_gqa_coupling(method):
    model = tiny(layers=3, kv=4, heads=8, inter=128)
    imap = prune(model, method, 0.5, layers=[1, 2], calibration=[ids(1)])
    hd = 64 // 8
    for i in (1, 2):
        keep = imap.layers[i]
        assert len(keep.kv_heads) == 2 and len(keep.mlp_channels) == 64
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        assert attn.q_proj.weight.shape == (2 * 2 * hd, 64)  # 2 KV heads x group 2 query heads
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (2 * hd, 64)
        assert attn.o_proj.weight.shape == (2 * 2 * hd, 64)[::-1]
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (64, 64)
        assert mlp.down_proj.weight.shape == (64, 64)
        assert attn.num_key_value_groups == 2
        assert imap.query_heads(i) == [h * 2 + j for h in keep.kv_heads for j in range(2)]
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (128, 64)  # untouched layer
    out = model(input_ids=ids()).logits
    assert out.shape == (2, 16, 260) and torch.isfinite(out).all()


def test_kept_weights_are_the_original_rows_and_columns():
    model = tiny(kv=2, heads=4)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    imap = prune(model, "l2", 0.5, layers=[0])
    attn = model.model.layers[0].self_attn
    rows = torch.tensor(imap.rows(0, "q_proj"))
    assert torch.equal(attn.q_proj.weight, ref["model.layers.0.self_attn.q_proj.weight"][rows])
    cols = torch.tensor(imap.cols(0, "down_proj"))
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, ref["model.layers.0.mlp.down_proj.weight"][:, cols])


def test_l2_keeps_the_largest_groups():
    model = tiny(kv=2, heads=4)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[16:] *= 100  # KV head 1 (head_dim 16)
        model.model.layers[0].mlp.up_proj.weight[[3, 7]] *= 100
    imap = prune(model, "l2", 0.5, layers=[0])
    assert imap.layers[0].kv_heads == [1]
    assert {3, 7} <= set(imap.layers[0].mlp_channels)


def test_ratio_zero_is_the_identity():
    model = tiny()
    x = ids()
    before = model(input_ids=x).logits
    imap = prune(model, "l2", 0.0)
    assert all(len(k.kv_heads) == 2 and len(k.mlp_channels) == 128 for k in imap.layers.values())
    assert torch.equal(model(input_ids=x).logits, before)


def test_random_is_seeded():
    a, b = tiny(), tiny()
    assert prune(a, "random", 0.5, seed=3).to_dict() == prune(b, "random", 0.5, seed=3).to_dict()


def test_wanda_masks_per_row_and_keeps_shapes():
    model = tiny()
    imap = prune(model, "wanda", 0.5, layers=[1], calibration=[ids(2)])
    w = model.model.layers[1].mlp.gate_proj.weight
    assert w.shape == (128, 64)
    assert torch.equal((w == 0).sum(1), torch.full((128,), 32))
    assert (model.model.layers[0].mlp.gate_proj.weight != 0).all()
    assert not imap.structured and imap.rows(1, "q_proj") is None


def test_wanda_uses_activation_norms():
    model = tiny()
    lin = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        lin.weight.fill_(1.0)
    norms = {}
    from memwise_loram.importance import input_norms

    norms = input_norms(model, [0], [ids(2)], IndexMap.for_config("l2", 0.5, model.config).paths)[0]["mlp.down_proj"]
    prune(model, "wanda", 0.25, layers=[0], calibration=[ids(2)])
    kept = (lin.weight[0] != 0)
    # equal weights: the dropped columns are those with the smallest input norms
    assert norms[~kept].max() <= norms[kept].min()


def test_two_four_pattern():
    model = tiny()
    prune(model, "2:4", 0.5, layers=[0], calibration=[ids(2)])
    for lin in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.down_proj):
        groups = (lin.weight != 0).view(lin.weight.shape[0], -1, 4).sum(2)
        assert (groups <= 2).all() and groups.float().mean() > 1.99


def test_index_map_round_trip(tmp_path):
    model = tiny()
    imap = prune(model, "l2", 0.5, layers="1")
    imap.save(tmp_path)
    assert IndexMap.load(tmp_path).to_dict() == imap.to_dict()
