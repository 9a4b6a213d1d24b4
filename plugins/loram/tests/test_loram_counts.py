"""Parameter counts: closed form == a meta-device model, LLaMA-3.1-70B at 0.85 == the paper's figures."""


from memwise_loram import IndexMap, LayerKeep
from memwise_loram.counts import base_storage, layer_shapes, llama31_70b_config, lora_parameters
from memwise_loram.index_map import Geometry, kept_counts
from memwise_loram.storage import rebuild
from memwise.testing import tiny_llama_config

PAPER_FULL = 70_553_706_496


def _meta_count(cfg, ratio, layers):
    geo = Geometry.of(cfg)
    kv, ch = kept_counts(geo, ratio)
    imap = IndexMap.for_config("random", ratio, cfg, {i: LayerKeep(list(range(kv)), list(range(ch))) for i in layers})
    model = rebuild(cfg, imap, "meta")
    return sum(p.numel() for p in model.parameters())


def test_llama31_70b_pruned_at_085_matches_the_paper():
    cfg = llama31_70b_config()
    full = base_storage(cfg, layer_shapes(cfg, 0.0, None), 2)
    pruned = base_storage(cfg, layer_shapes(cfg, 0.85, "4-77"), 2)
    assert full["parameters"] == PAPER_FULL
    assert pruned["parameters"] == 17_849_982_976 == _meta_count(cfg, 0.85, range(4, 78))
    assert round(full["parameters"] / pruned["parameters"], 2) == 3.95
    # the paper counts NF4 as a quarter of a bf16 parameter (4 of 16 bits), scales left out
    assert pruned["parameters"] // 4 == 4_462_495_744
    assert round(full["parameters"] / (pruned["parameters"] / 4), 2) == 15.81
    # our exact NF4 bytes (projections NF4 + double-quantized scales, embeddings/head/norms bf16) are larger
    nf4 = base_storage(cfg, layer_shapes(cfg, 0.85, "4-77"), 2, {"block": 64, "double_quant": True, "dq_block": 256})
    assert pruned["bytes"] / 4 < nf4["bytes"] < pruned["bytes"] / 2


def test_closed_form_equals_built_model_for_small_configs():
    cfg = tiny_llama_config(layers=4, heads=8, kv=4, inter=96, tie_word_embeddings=True)
    for ratio in (0.0, 0.3, 0.5, 0.85):
        assert base_storage(cfg, layer_shapes(cfg, ratio, "1-2"), 4)["parameters"] == _meta_count(cfg, ratio, [1, 2])
    shapes = layer_shapes(cfg, 0.5, "1-2")
    assert shapes[0] == (4, 96) and shapes[1] == (2, 48)
    # rank 2 on q_proj only: 2 * (64 + 32) for the pruned layers, 2 * (64 + 64) for the others
    assert lora_parameters(cfg, shapes, 2, ["q_proj"]) == 2 * (2 * 96) + 2 * (2 * 128)
