"""LoRAM on the real test model, SmolLM2-135M-Instruct (9 query / 3 KV heads, MLP 1536): skipped without it."""

import copy

import pytest
import torch

from memwise.testing import require_real_model
from memwise_loram import LoraSpec, adapter_state, apply_loram, inject_lora, merge_lora, recover
from memwise_loram.counts import base_storage, layer_shapes


@pytest.mark.slow
def test_smollm2_pruning_keeps_gqa_groups_and_recovery_matches_the_pruned_model():
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(require_real_model()), dtype=torch.float32).eval()
    pruned = copy.deepcopy(full)
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0)
    imap, _ = apply_loram(pruned, "l2", 0.5, "1-28", spec)
    attn = pruned.model.layers[5].self_attn
    # one of three KV heads pruned with its three query heads: 2 KV heads, 6 query heads of 64
    assert attn.k_proj.base_layer.out_features == 2 * 64 and attn.q_proj.base_layer.out_features == 6 * 64
    assert attn.o_proj.base_layer.in_features == 6 * 64 and pruned.model.layers[5].mlp.up_proj.out_features == 768
    assert pruned.model.layers[0].self_attn.q_proj.base_layer.out_features == 9 * 64  # first layer kept whole
    frozen = sum(p.numel() * p.element_size() for n, p in pruned.named_parameters() if ".lora_" not in n)
    assert frozen == base_storage(full.config, layer_shapes(full.config, 0.5, "1-28"), 4)["bytes"]
    for m in pruned.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    recovered = recover(adapter_state(pruned), imap)
    inject_lora(full, spec, freeze=False)
    assert not full.load_state_dict(recovered, strict=False).unexpected_keys
    merge_lora(full)
    merge_lora(pruned)
    with torch.no_grad():  # the recovered update is the pruned one on kept positions, zero elsewhere
        for i in (0, 5):
            for path in imap.paths.values():
                d_full = full.model.layers[i].get_submodule(path).weight
                rows, cols = imap.rows(i, path), imap.cols(i, path)
                if rows is not None:
                    d_full = d_full[rows]
                if cols is not None:
                    d_full = d_full[:, cols]
                torch.testing.assert_close(d_full, pruned.model.layers[i].get_submodule(path).weight)
        assert torch.isfinite(full(input_ids=ids).logits).all()
