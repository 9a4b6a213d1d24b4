"""The plugin: config checks, hooks, checkpoint state, the export command, activation estimate."""

import argparse
import copy
import io

import pytest
import torch
from transformers import LlamaForCausalLM

from memwise import MemoryEstimate, RecipeError, RunContext, Workload
from memwise.memory import llama_activation_bytes, measure_step
from memwise_loram import LoramPlugin, read_peft, save_pruned
from memwise_loram.cli import add_commands
from memwise.testing import tiny_llama


def tiny():
    return tiny_llama()


def test_metadata():
    assert LoramPlugin.phase == "prune" and LoramPlugin.required_on_load
    assert LoramPlugin.distribution == "memwise-loram" and "coat" in LoramPlugin.composes_with


def test_bad_config_reports_every_problem():
    with pytest.raises(RecipeError) as err:
        LoramPlugin(ratio=1.5, rank=0, layers="x-")
    keys = {p.key for p in err.value.problems}
    assert {"loram.ratio", "loram.rank", "loram.layers"} <= keys
    with pytest.raises(RecipeError, match="did you mean"):
        LoramPlugin(methd="l2")
    with pytest.raises(RecipeError, match="2:4 always prunes one half"):
        LoramPlugin(method="2:4", ratio=0.3)


def test_validate_against_the_model():
    plugin = LoramPlugin(layers="1-5", method="taylor", targets=["q_proj", "qproj"])
    problems = plugin.memwise_validate(ctx=RunContext(stage="fit", model=tiny()))
    assert {p.key for p in problems} == {"loram.layers", "loram.method", "loram.targets"}
    assert "'qproj'" in next(p.message for p in problems if p.key == "loram.targets")
    assert LoramPlugin().memwise_validate(ctx=RunContext(stage="fit", model=tiny())) == []


def test_transform_claims_and_state_dict_loads_weights_only(tmp_path):
    plugin = LoramPlugin(ratio=0.5, layers="1", rank=2)
    ctx = RunContext(stage="fit", model=tiny())
    plugin.memwise_transform_model(ctx=ctx)
    claimed = ctx.claims.claims_of("loram")
    assert "model.layers.1.mlp.down_proj" in claimed and len(claimed) == 14
    state = plugin.memwise_state_dict(ctx=ctx)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = LoramPlugin(ratio=0.5, layers="1", rank=2)
    other.memwise_load_state_dict(ctx=ctx, state=loaded)
    assert other.index_map.to_dict() == plugin.index_map.to_dict()
    with pytest.raises(Exception, match="pruned differently"):
        changed = copy.deepcopy(loaded)
        changed["index_map"]["layers"]["1"]["kv_heads"] = [0] if loaded["index_map"]["layers"]["1"]["kv_heads"] != [0] else [1]
        plugin.memwise_load_state_dict(ctx=ctx, state=changed)


def test_on_fit_end_and_export_command_agree(tmp_path):
    plugin = LoramPlugin(ratio=0.5, layers="0", rank=2, dropout=0.0, evaluate=False)
    ctx = RunContext(stage="fit", model=tiny(), report_dir=tmp_path / "report")
    plugin.memwise_transform_model(ctx=ctx)
    with torch.no_grad():
        for name, p in ctx.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plugin.memwise_on_fit_end(ctx=ctx)
    hook_adapters, spec = read_peft(tmp_path / "report" / "adapter")
    assert spec.rank == 2 and len(hook_adapters) == 28
    # the same adapter exported by the CLI, from a lightning-style checkpoint and from a saved folder
    ckpt = {"state_dict": {"model." + k: v for k, v in ctx.model.state_dict().items()},
            "memwise": {"plugins": {"loram": plugin.memwise_state_dict(ctx=ctx)}}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    save_pruned(ctx.model, plugin.index_map, tmp_path / "pruned", plugin.spec)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    for source, out in ((tmp_path / "last.ckpt", tmp_path / "a"), (tmp_path / "pruned", tmp_path / "b")):
        args = parser.parse_args(["loram", "export", str(source), "--out", str(out)])
        assert args.func(args) == 0
        exported, _ = read_peft(out)
        assert exported.keys() == hook_adapters.keys()
        assert all(torch.equal(exported[k], hook_adapters[k]) for k in exported)


@pytest.mark.slow
def test_activation_estimate_within_5_percent():
    model = tiny()
    workload = Workload(2, 32)
    plugin = LoramPlugin(ratio=0.5, dropout=0.05)
    base = MemoryEstimate(activations=llama_activation_bytes(model.config, 2, 32))
    ctx = RunContext(stage="fit", model=model, workload=workload)
    predicted = base.apply(plugin.memwise_estimate_memory(ctx=ctx, estimate=base)).activations
    plugin.memwise_transform_model(ctx=ctx)
    model.train()
    x = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    measured = measure_step(model, opt, lambda: model(input_ids=x, labels=x).loss).after_forward["activations"]
    assert abs(predicted / measured - 1) < 0.05


def test_taylor_and_alignment_from_the_run_corpus():
    import numpy as np
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    docs = [np.concatenate([[257], rng.integers(0, 256, 40), [258]]).astype(np.int32) for _ in range(6)]
    corpus = SimpleNamespace(train=docs, tokenizer=SimpleNamespace(pad_id=256, vocab_size=260))
    model = tiny()
    head = model.lm_head.weight.detach().clone()
    embed = model.model.embed_tokens.weight.detach().clone()
    plugin = LoramPlugin(method="taylor", ratio=0.5, layers="0", calibration_batches=1, calibration_batch_size=2,
                         align_steps=2, align_lr=1e-3, align_on="train", rank=2)
    ctx = RunContext(stage="fit", model=model, corpus=corpus, workload=Workload(2, 16))
    assert plugin.memwise_validate(ctx=ctx) == []
    plugin.memwise_transform_model(ctx=ctx)
    assert torch.equal(model.lm_head.weight, head)  # the paper's alignment keeps the LM head frozen
    assert not torch.equal(model.model.embed_tokens.weight, embed)  # everything else trained
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(plugin.index_map.layers[0].kv_heads) == 1


def test_save_base_writes_a_loadable_hf_folder(tmp_path):
    model = tiny()
    fields = {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "intermediate_size")}
    ckpt = {"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
            "memwise": {"manifest": {"recipe": {"model": {"builder": "llama", "config": fields}, "plugins": []}}}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["loram", "save-base", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "m")])
    assert args.func(args) == 0
    again = LlamaForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    x = torch.randint(0, 260, (1, 8))
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, model.eval()(input_ids=x).logits)
