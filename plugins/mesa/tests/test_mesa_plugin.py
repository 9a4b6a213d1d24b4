"""MesaPlugin: metadata, config errors, conflicts, claims, estimates, checkpoint state, loss curve."""

import copy
import io

import pytest
import torch
from transformers import LlamaForCausalLM

import memwise
from memwise.context import RunContext, Workload
from memwise.plan import check
from memwise_mesa import MesaPlugin, apply_mesa, load_ranges_state_dict, ranges_state_dict, rounding
from memwise.testing import tiny_llama


def llama(hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    return tiny_llama(hidden=hidden, layers=layers, inter=2 * hidden, use_cache=False)


def test_metadata_and_capability():
    p = MesaPlugin()
    assert (p.name, p.phase, p.distribution) == ("mesa", "replace", "memwise-mesa")
    assert p.provides() == {"activation.storage"}
    assert check([p], "fit") == []


def test_bad_config_reports_every_problem():
    with pytest.raises(memwise.RecipeError) as err:
        MesaPlugin(bits=4, decay=1.5, layers=["linear", "softmax"])
    keys = {p.key for p in err.value.problems}
    assert keys == {"mesa.bits", "mesa.decay", "mesa.layers"}


def test_conflict_with_coat_activations_names_the_switch():
    coat = pytest.importorskip("memwise_coat")
    problems = check([MesaPlugin(), coat.CoatPlugin(activations=True)], "fit")
    assert any("coat.activations: false" in p.message for p in problems)
    assert check([MesaPlugin(), coat.CoatPlugin(activations=False)], "fit") == []


def test_transform_claims_estimate_and_teardown():
    model = llama()
    plugin = MesaPlugin(exclude=["*lm_head"])
    ctx = RunContext(stage="fit", plugins=[plugin], model=model, workload=Workload(4, 48))
    assert plugin.memwise_validate(ctx) == []
    before = memwise.memory.parameter_bytes(model)
    delta = plugin.memwise_estimate_memory(ctx, memwise.MemoryEstimate())
    plugin.memwise_transform_model(ctx)
    assert memwise.memory.parameter_bytes(model) - before == delta.parameters
    assert delta.gradients == 0 and delta.optimizer_state == 0 and delta.activations < 0
    assert "model.layers.0.self_attn.q_proj" in ctx.claims.claims_of("mesa")
    assert "lm_head" not in ctx.claims.claims_of("mesa")
    assert ctx.shared["mesa"]["converted"]["attention"] == 2
    plugin.memwise_teardown(ctx)
    assert not any("mesa_" in k for k in model.state_dict())


def test_validate_reports_patterns_that_select_nothing():
    ctx = RunContext(stage="fit", model=llama())
    problems = MesaPlugin(include=["nothing.*"]).memwise_validate(ctx)
    assert [p.key for p in problems] == ["mesa.include"]


def _train(model, steps, data, opt=None):
    opt = opt or torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for i in range(steps):
        x = data[i % len(data)]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, opt


def _data(batches: int = 8):
    """A noisy Markov chain (next = 7 * prev + {0, 1, 2} mod 40): learnable down to about ln 3."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(batches):
        x = torch.zeros(8, 32, dtype=torch.long)
        x[:, 0] = torch.randint(0, 40, (8,), generator=g)
        for t in range(1, 32):
            x[:, t] = (7 * x[:, t - 1] + torch.randint(0, 3, (8,), generator=g)) % 40
        out.append(x)
    return out


def test_checkpoint_restores_ranges_from_model_state_and_from_plugin_state():
    data = _data()
    model = llama()
    plugin = MesaPlugin()
    ctx = RunContext(stage="fit", plugins=[plugin], model=model)
    plugin.memwise_transform_model(ctx)
    _train(model, 3, data)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "mesa": plugin.memwise_state_dict(ctx)}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    alpha = model.model.layers[1].self_attn.mesa_key.alpha
    assert int(model.model.layers[1].self_attn.mesa_key.steps) == 3

    fresh = llama()
    apply_mesa(fresh)
    fresh.load_state_dict(ckpt["model"])
    assert torch.equal(fresh.model.layers[1].self_attn.mesa_key.alpha, alpha)

    other = llama()
    ctx2 = RunContext(stage="fit", plugins=[MesaPlugin()], model=other)
    ctx2.plugins[0].memwise_transform_model(ctx2)
    ctx2.plugins[0].memwise_load_state_dict(ctx2, ckpt["mesa"])
    assert torch.equal(other.model.layers[1].self_attn.mesa_key.alpha, alpha)
    assert ranges_state_dict(other).keys() == ranges_state_dict(model).keys()
    with pytest.raises(KeyError):
        load_ranges_state_dict(llama(), ckpt["mesa"]["ranges"])


def test_resume_reproduces_the_uninterrupted_run():
    data = _data()
    straight = llama()
    apply_mesa(straight)
    torch.manual_seed(5)
    full, _ = _train(straight, 6, data)

    first = llama()
    apply_mesa(first)
    torch.manual_seed(5)
    head, opt = _train(first, 3, data)
    state = {"model": copy.deepcopy(first.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "rng": torch.get_rng_state(), "rounding": rounding.state_dict()}
    resumed = llama()
    apply_mesa(resumed)
    resumed.load_state_dict(state["model"])
    rounding.load_state_dict(state["rounding"])  # Mesa's stochastic-rounding stream
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=3e-3)
    opt2.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    tail, _ = _train(resumed, 3, data[3:] + data[:3], opt2)
    assert head + tail == full


@pytest.mark.slow
def test_loss_curve_of_100_steps_stays_close_to_the_baseline():
    data = _data(100)
    base = llama(hidden=32, layers=1)
    mesa = copy.deepcopy(base)
    apply_mesa(mesa)
    torch.manual_seed(3)
    lb, _ = _train(base, 100, data)
    lm, _ = _train(mesa, 100, data)
    assert sum(lb[-10:]) < 0.5 * sum(lb[:10])  # it learns
    for i in range(0, 100, 10):  # mean of each block of 10 steps within 3%
        a, b = sum(lb[i:i + 10]) / 10, sum(lm[i:i + 10]) / 10
        assert abs(a - b) <= 0.03 * a, (i, a, b)


@pytest.mark.slow
def test_activation_estimate_within_15_percent_of_measured_change():
    from memwise.memory import measure_step

    torch.manual_seed(1)
    x = torch.randint(0, 260, (4, 48))
    model = llama()
    plugin = MesaPlugin()
    ctx = RunContext(stage="fit", plugins=[plugin], model=model, workload=Workload(4, 48))
    predicted = plugin.memwise_estimate_memory(ctx, memwise.MemoryEstimate()).activations
    saved = []
    for convert in (False, True):
        if convert:
            plugin.memwise_transform_model(ctx)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        report = measure_step(model, opt, lambda: model(input_ids=x, labels=x, use_cache=False).loss)
        saved.append(report.after_forward["activations"])
    measured = saved[1] - saved[0]
    assert abs(predicted - measured) <= 0.15 * abs(measured), (predicted, measured)


@pytest.mark.slow
def test_import_is_light():
    """Plugin discovery must never import triton (nor transformers)."""
    import subprocess
    import sys

    code = "import sys, memwise_mesa; print('triton' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr
