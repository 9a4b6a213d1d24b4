"""Converted layers on a small HF Llama: exact forward, gradients at >= 30 dB SNR, shared
quantization, SDPA attention kept, idempotence, include/exclude, autocast, generic mode."""

import copy
import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

import memwise
from memwise.memory import measure_step
from memwise_mesa import apply_mesa, generic_mesa, revert_mesa
from memwise_mesa import MesaPlugin, RangeQuantizer
from memwise_mesa.layers import MesaLinearMixin, RangeCodec
from memwise.testing import tiny_llama


def llama(layers: int = 2) -> LlamaForCausalLM:
    return tiny_llama(layers=layers, use_cache=False)


def batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 260, (4, 48))


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def snr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


def test_forward_is_exact_and_gradients_within_30_db():
    base = llama()
    mesa = copy.deepcopy(base)
    report = apply_mesa(mesa)
    assert report.counts() == {"norm": 5, "linear": 13, "attention": 2, "glu": 2}  # down_proj inside glu
    x = batch()
    lb, gb = loss_and_grads(base, x)
    lm, gm = loss_and_grads(mesa, x)
    assert torch.equal(lb, lm)
    assert snr_db(gb, gm) >= 30


def test_head_channel_attention_ranges_give_closer_gradients_than_head_ranges():
    base = llama()
    x = batch()
    _, gb = loss_and_grads(base, x)
    snr = {}
    for groups in ("head", "head_channel"):
        mesa = copy.deepcopy(base)
        apply_mesa(mesa, kinds=("attention",), stochastic=False, attention_groups=groups)
        assert mesa.model.layers[0].self_attn.mesa_query.layout == groups
        snr[groups] = snr_db(gb, loss_and_grads(mesa, x)[1])
    assert snr["head_channel"] > snr["head"] + 1, snr  # 2.2 dB here; ~4 dB on q_proj of a trained `tiny`
    with pytest.raises(ValueError, match="attention_groups"):
        apply_mesa(copy.deepcopy(base), attention_groups="token")


def test_attention_stays_sdpa_and_never_eager(monkeypatch):
    import transformers.models.llama.modeling_llama as llama_mod

    def no_eager(*args, **kwargs):
        raise AssertionError("eager attention was used")

    monkeypatch.setattr(llama_mod, "eager_attention_forward", no_eager)
    model = llama()
    apply_mesa(model)
    assert model.config._attn_implementation == "memwise_mesa_sdpa"
    loss_and_grads(model, batch())
    assert int(model.model.layers[0].self_attn.mesa_query.steps) == 1
    assert model.model.layers[0].self_attn.mesa_query.groups == 4 * 16  # one range per head and channel
    assert model.model.layers[0].self_attn.mesa_key.groups == 2 * 16


def test_one_packed_copy_for_a_tensor_saved_by_q_k_and_v():
    model = llama(1)
    apply_mesa(model)
    out = model.model(input_ids=batch()).last_hidden_state
    packed = []
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "SavedLinearBackward" and fn.packed.shape[-1] == 64:
            packed.append(fn.packed)
        stack += [n for n, _ in fn.next_functions]
    # q, k, v share the input_layernorm output; gate, up share post_attention_layernorm's; o_proj has its own
    assert len(packed) == 6
    assert len({id(p) for p in packed}) == 3


def test_idempotent_include_exclude_and_revert():
    model = llama()
    names = [n for n, _ in model.named_parameters()]
    first = apply_mesa(model, exclude=["*lm_head", "model.layers.1.*"])
    assert not isinstance(model.lm_head, MesaLinearMixin)
    assert not isinstance(model.model.layers[1].self_attn.q_proj, MesaLinearMixin)
    assert isinstance(model.model.layers[0].self_attn.q_proj, MesaLinearMixin)
    # the gated MLP computes its plain down projection itself (its input is never saved)
    assert first.converted["model.layers.0.mlp"] == "glu" and "model.layers.0.mlp.down_proj" not in first.converted
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    with pytest.warns(memwise.NoEffectWarning):
        apply_mesa(model, exclude=["*lm_head", "model.layers.1.*"])
    report = apply_mesa(model, include=["model.layers.1.*"])
    assert all(n.startswith("model.layers.1.") for n in report.converted)
    assert [n for n, _ in model.named_parameters()] == names
    revert_mesa(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any("mesa_" in k for k in model.state_dict())
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_bf16_autocast_and_bf16_weights_train():
    x = batch()
    for precision in ("autocast", "bf16"):
        base = llama()
        if precision == "bf16":
            base = base.to(torch.bfloat16)
        mesa = copy.deepcopy(base)
        apply_mesa(mesa)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            lb, gb = loss_and_grads(base, x)
            lm, gm = loss_and_grads(mesa, x)
        assert torch.equal(lb, lm)
        assert snr_db(gb.float(), gm.float()) >= 25  # bf16 gradients themselves carry about 8 bits


class ExplicitAttention(torch.nn.Module):
    """Attention written with matmul and softmax: only generic mode reaches its saved tensors."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        return (attn @ v).transpose(1, 2).reshape(x.shape)


@pytest.mark.slow
def test_generic_mode_packs_tensors_of_explicit_attention():
    torch.manual_seed(0)
    model = ExplicitAttention()
    x = torch.randn(2, 64, 32, requires_grad=True)
    model(x).pow(2).sum().backward()
    ref = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])
    x.grad = None
    model.zero_grad()
    with generic_mesa(min_numel=1024):
        out = model(x)
    out.pow(2).sum().backward()
    got = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()])
    assert snr_db(ref, got) >= 25
    # and the bytes it saves for backward fall (exact with MemTracker)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    plain = measure_step(model, opt, lambda: model(x).pow(2).sum()).after_forward["activations"]
    packed = measure_step(model, opt, lambda: model(x).pow(2).sum(),
                          context=lambda: generic_mesa(min_numel=1024)).after_forward["activations"]
    assert packed <= 0.6 * plain, (packed, plain)  # measured 0.55: the output and small saves stay


def test_frozen_linear_weight_saves_no_input():
    model = llama(1)
    apply_mesa(model)
    model.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.model(input_ids=batch()).last_hidden_state
    out.sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_attention_dropout_is_replayed_in_backward():
    base = tiny_llama(use_cache=False, attention_dropout=0.2)
    mesa = copy.deepcopy(base)
    apply_mesa(mesa, stochastic=False)  # no random draws in packing: both runs see the same dropout masks
    x = batch()
    torch.manual_seed(7)
    lb, gb = loss_and_grads(base, x)
    torch.manual_seed(7)
    lm, gm = loss_and_grads(mesa, x)
    assert torch.equal(lb, lm)
    assert snr_db(gb, gm) >= 30


def _snapshot(model: torch.nn.Module) -> dict:
    return {"classes": [(n, type(m)) for n, m in model.named_modules()],
            "attrs": [(n, sorted(vars(m))) for n, m in model.named_modules()],
            "params": [(n, id(p)) for n, p in model.named_parameters()],
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def test_revert_gives_back_the_model_bitwise():
    model = llama()
    ids = batch()
    before, logits = _snapshot(model), model(input_ids=ids).logits
    apply_mesa(model)
    model(input_ids=ids).logits.sum().backward()  # ranges move, packs are made
    model.zero_grad(set_to_none=True)
    revert_mesa(model)
    after = _snapshot(model)
    assert {k: v for k, v in before.items() if k != "state"} == {k: v for k, v in after.items() if k != "state"}
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(v, after["state"][k]) for k, v in before["state"].items())
    assert model.config._attn_implementation == "sdpa" and torch.equal(model(input_ids=ids).logits, logits)


def test_layers_select_decoder_layers_as_in_every_plugin():
    model = llama(3)
    report = apply_mesa(model, layers="1-2")
    assert report.converted and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in report.converted)
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(memwise.RecipeError, match="mesa.kinds"):
        MesaPlugin(layers=["linear", "norm"])  # the old meaning of mesa.layers names its new key
    assert MesaPlugin(kinds=["linear"], layers=[0, -1]).config.layers == [0, -1]


def test_range_codec_round_trip_and_nbytes_are_exact():
    torch.manual_seed(0)
    q = RangeQuantizer("channel", 4, stochastic=False)
    x = torch.randn(6, 5, 16)
    codec = RangeCodec(q, update=True)
    packed = codec.pack(x)
    held = sum(t.untyped_storage().nbytes() for t in (packed.payload, packed.scale, packed.offset))
    assert codec.nbytes(packed) == held == x.numel() + 2 * 4 * 4
    y = codec.unpack(packed, torch.float32)
    step = packed.scale.repeat_interleave(4)  # one range per 4 contiguous channels: rounding is within half a step
    assert y.dtype == torch.float32 and ((y - x).abs() <= step / 2 + 1e-6).all()
    assert codec.unpack(packed, torch.bfloat16).dtype == torch.bfloat16
