"""LoRA layers, recovery to the full shapes, PEFT export round trip, pruned save/reload."""

import copy

import pytest
import torch

from memwise_loram import (LoraLinear, LoraSpec, adapter_state, apply_loram, export_recovered, inject_lora,
                           load_pruned, merge_lora, read_peft, recover, save_pruned)
from memwise.testing import tiny_llama


def tiny(layers=2):
    return tiny_llama(layers=layers).eval()


def ids():
    return torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(5))


def trained_loram(model, spec=LoraSpec(rank=4, alpha=8.0, dropout=0.0), **kw):
    """A pruned model whose adapters have non-zero B (as after training)."""
    pruned = copy.deepcopy(model)
    imap, names = apply_loram(pruned, "l2", 0.5, layers=[1], spec=spec, **kw)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)
    return pruned.eval(), imap, names


def test_only_adapters_train():
    pruned, _, names = trained_loram(tiny())
    assert len(names) == 14
    trainable = {n for n, p in pruned.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 28
    loss = pruned(input_ids=ids(), labels=ids()).loss
    loss.backward()
    assert all(p.grad is None for n, p in pruned.named_parameters() if not p.requires_grad)


def test_inject_is_idempotent_and_warns_on_no_effect():
    model = tiny()
    spec = LoraSpec(rank=2)
    assert len(inject_lora(model, spec, exclude=["model.layers.1"])) == 7
    with pytest.warns(Warning, match="wrapped nothing"):
        assert inject_lora(model, spec, include=["model.layers.0"]) == []


def test_recovered_delta_matches_on_kept_positions_and_is_zero_elsewhere():
    pruned, imap, _ = trained_loram(tiny())
    small = adapter_state(pruned)
    full = recover(small, imap)
    spec_scale = 8.0 / 4
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        key = f"model.layers.1.{module}"
        leaf = module.split(".")[1]
        d_small = small[key + ".lora_B.weight"] @ small[key + ".lora_A.weight"] * spec_scale
        d_full = full[key + ".lora_B.weight"] @ full[key + ".lora_A.weight"] * spec_scale
        rows = imap.rows(1, leaf) or list(range(d_full.shape[0]))
        cols = imap.cols(1, leaf) or list(range(d_full.shape[1]))
        assert torch.equal(d_full[rows][:, cols], d_small)
        mask = torch.ones_like(d_full, dtype=torch.bool)
        mask[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = False
        assert mask.any() and torch.count_nonzero(d_full[mask]) == 0
    # the unpruned layer's adapters pass through unchanged
    assert torch.equal(full["model.layers.0.mlp.up_proj.lora_B.weight"], small["model.layers.0.mlp.up_proj.lora_B.weight"])


def test_peft_round_trip_gives_our_merged_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny()
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0)
    pruned, imap, _ = trained_loram(base, spec)
    folder = export_recovered(pruned, imap, spec, tmp_path / "adapter")
    assert {p.name for p in folder.iterdir()} == {"adapter_model.safetensors", "adapter_config.json",
                                                  "loram_index_map.json"}
    x = ids()
    with torch.no_grad():
        plain = base(input_ids=x).logits
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
        peft_logits = loaded(input_ids=x).logits
        ours = copy.deepcopy(base)
        adapters, read_spec = read_peft(folder)
        inject_lora(ours, read_spec)
        missing = ours.load_state_dict(adapters, strict=False)
        assert not missing.unexpected_keys
        merge_lora(ours)
        merged = ours(input_ids=x).logits
    assert (peft_logits - plain).abs().max() > 1e-3  # the adapter really acts (loads "with no effect" is a known bug)
    torch.testing.assert_close(peft_logits, merged, rtol=1e-5, atol=1e-5)


def test_pruned_model_save_reload_identical_logits(tmp_path):
    pruned, imap, _ = trained_loram(tiny(layers=3))
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0)
    save_pruned(pruned, imap, tmp_path, spec)
    again, imap2, spec2 = load_pruned(tmp_path)
    assert imap2.to_dict() == imap.to_dict() and spec2 == spec.for_model(pruned)
    assert spec2.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    x = ids()
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=x).logits, pruned(input_ids=x).logits)


def test_nf4_pruned_model_save_reload_identical_logits(tmp_path):
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0)
    nf4 = {"block": 64, "double_quant": True, "dq_block": 256}
    pruned, imap, _ = trained_loram(tiny(), spec, nf4=nf4)
    save_pruned(pruned, imap, tmp_path, spec, nf4)
    again, _, _ = load_pruned(tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=x).logits, pruned(input_ids=x).logits)
