"""The plugin: config validation, generation wiring, teardown, discovery; scoring helpers against oracles."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from importlib import metadata

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from kvprune_helpers import generate, prompts, tiny_llama  # noqa: E402

import memwise  # noqa: E402
from memwise_kvprune import KVPrunePlugin, scoring  # noqa: E402
from memwise_kvprune.cache import PrunedCache  # noqa: E402
from memwise_kvprune.fp8store import FP8Rows  # noqa: E402
from memwise_kvprune.compat import cache_kwarg  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


def test_bad_config_reports_every_problem():
    with pytest.raises(memwise.RecipeError) as err:
        KVPrunePlugin(think_ratio=1.0, kernel=4, budget=0.0, eviction="snapkv", think_observe=0)
    keys = sorted(p.key for p in err.value.problems)
    assert keys == ["kvprune.budget", "kvprune.kernel", "kvprune.think_observe", "kvprune.think_ratio"]


def test_budget_without_eviction_is_not_ignored():
    with pytest.raises(memwise.RecipeError, match="eviction is 'none'"):
        KVPrunePlugin(budget=0.3)


def test_metadata_and_capability():
    plugin = KVPrunePlugin()
    assert plugin.provides() == {"kv.cache"}
    assert plugin.stages == ("generate",) and plugin.phase == "runtime"
    (ep,) = [e for e in metadata.entry_points(group="memwise.plugins") if e.name == "kvprune"]
    assert ep.load() is KVPrunePlugin


def test_wrap_generation_installs_cache_and_teardown_restores_model():
    model = tiny_llama()
    ids, mask = prompts()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    ctx = memwise.RunContext(stage="generate", model=model)
    plugin = KVPrunePlugin(think_ratio=0.5, think_window=8, eviction="streaming", budget=0.5, quant="e4m3")
    plugin.memwise_wrap_generation(ctx=ctx)
    cache = ctx.generate_kwargs[cache_kwarg("generate")]
    assert isinstance(cache, PrunedCache)
    assert model.config._attn_implementation == "memwise_kvprune"
    out = generate(model, ids, mask, cache, new=4)
    assert out.shape == (2, 4) and cache.nbytes() < cache.dense_nbytes()
    ctx.run_teardown()
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


@pytest.mark.slow
def test_import_loads_no_transformers_or_triton():
    code = "import sys, memwise_kvprune; print('transformers' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_snapkv_scores_match_a_loop_oracle():
    torch.manual_seed(0)
    b, h, g, s, l, d = 1, 2, 2, 3, 10, 8
    q, k = torch.randn(b, h, g, s, d), torch.randn(b, h, l, d)
    visible = torch.ones(b, 1, s, l, dtype=torch.bool)
    got = scoring.snapkv_scores(q, k, visible, 0.5, kernel=1)
    want = torch.zeros(b, h, l)
    for hh in range(h):
        for gg in range(g):
            for ss in range(s):
                want[0, hh] += torch.softmax(q[0, hh, gg, ss] @ k[0, hh].T * 0.5, dim=-1)
    torch.testing.assert_close(got, want)


def test_select_tokens_keeps_window_and_best_and_skips_padding():
    scores = torch.tensor([[[9.0, 8.0, 0.1, 5.0, 0.2, 0.3, 0.0]]])
    valid = torch.tensor([[False, True, True, True, True, True, True]])
    got = scoring.select_tokens(scores, valid, keep=4, always_last=2)
    assert got.tolist() == [[[1, 3, 5, 6]]]


def test_channel_indices_use_smallest_integer_type():
    scores = torch.rand(1, 2, 64)
    idx = scoring.top_channels(scores, 32)
    assert idx.dtype == torch.uint8 and idx.shape == (1, 2, 32)
    assert torch.equal(idx.long(), scores.topk(32, -1).indices.sort(-1).values)


def test_fp8_rows_lie_on_the_grid_and_count_scales():
    from memwise.kernels.fp8 import E4M3, round_to_grid

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16) * 7
    rows = FP8Rows.encode(x, "e4m3")
    payload = rows.payload.float()
    assert torch.equal(payload, round_to_grid(payload, E4M3))
    assert payload.abs().amax(-1).eq(448).all()
    assert rows.nbytes() == x.numel() + 2 * 3 * 5 * 2
    rel = (rows.decode(torch.float32) - x).abs() / x.abs().amax(-1, keepdim=True)
    assert rel.max() <= 2 ** -4


def test_predict_callback_gives_each_batch_a_pruned_cache():
    import lightning.pytorch as pl

    model = tiny_llama()
    ids, mask = prompts()
    plugin = KVPrunePlugin(think_ratio=0.5, think_window=8, eviction="snapkv", budget=0.6, evict_observe=8)

    class Generator(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.caches = []

        def predict_step(self, batch, batch_idx):
            cache = self.generate_kwargs[cache_kwarg("generate")]
            self.caches.append(cache)
            return generate(self.model, batch[0], batch[1], cache, new=4)

    module = Generator()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[plugin.predict_callback()])
    (got,) = trainer.predict(module, loader)
    assert isinstance(module.caches[0], PrunedCache) and module.caches[0].layers[0].compressed
    assert model.config._attn_implementation == "sdpa"
    from memwise_kvprune import pruned_generation

    with pruned_generation(model, **plugin.cache_settings()) as cache:
        want = generate(model, ids, mask, cache, new=4)
    assert torch.equal(got, want)


def test_validate_rejects_a_model_without_pluggable_attention():
    plugin = KVPrunePlugin()
    assert plugin.memwise_validate(ctx=memwise.RunContext(stage="generate", model=tiny_llama())) == []
    (problem,) = plugin.memwise_validate(ctx=memwise.RunContext(stage="generate", model=torch.nn.Linear(2, 2)))
    assert problem.key == "kvprune" and "pluggable attention" in problem.message


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_widen_times_scale_is_decode_for_every_byte(fmt):
    """The bit-shift widening is exact for all 256 codes (subnormals and zeros too), in fp32 and bf16."""
    dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    finite = codes.float().isfinite()
    payload = codes[finite].reshape(1, 1, -1, 1).expand(1, 1, -1, 4).contiguous()
    scale = torch.rand(1, 1, payload.shape[2], 1).to(torch.bfloat16)
    rows = FP8Rows(payload, scale)
    for out_dtype in (torch.float32, torch.bfloat16):
        wide, s = rows.widen(out_dtype)
        assert wide.dtype == out_dtype
        assert torch.equal(wide.float() * (s / scale.float()), payload.float())
        torch.testing.assert_close(wide.float() * s, rows.decode(torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("width,group", [(64, 32), (32, 32), (13, 4), (8, 8)])
def test_int4_rows_round_to_the_nearest_code_and_widen_to_decode(width, group):
    """Codes are round(x / s) with s = bf16-ceil(max|x| / 7) per token and group; ``widen`` gives the same rows
    folded (one group) or applied (several), odd rows included; appending keeps every token's codes."""
    from memwise_kvprune.int4store import Int4Rows
    from memwise_kvprune.specs import Int4, groups_of

    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, width) * torch.logspace(-3, 2, 10)[:, None]
    g = groups_of(width, group)
    rows = Int4Rows.encode(x, g)
    xg = x.reshape(2, 3, 10, g, -1)
    exact = xg.abs().amax(-1, keepdim=True) / 7
    scale = exact.to(torch.bfloat16).float()
    scale = torch.where(scale < exact, torch.nextafter(scale.to(torch.bfloat16), torch.tensor(float("inf"),
                        dtype=torch.bfloat16)).float(), scale)
    want = ((xg / scale).round() * scale).reshape(x.shape)
    torch.testing.assert_close(rows.decode(torch.float32), want, rtol=0, atol=0)
    assert ((rows.decode(torch.float32) - x).abs() <= scale.reshape(2, 3, 10, g, 1).expand_as(xg).reshape(x.shape)
            / 2 + 1e-12).all()
    assert rows.nbytes() == 2 * 3 * 10 * Int4(group).row_bytes(width)
    wide, s = rows.widen(torch.float32)
    assert (s is None) == (g > 1)
    torch.testing.assert_close(wide if s is None else wide * s, want, rtol=0, atol=0)
    both = rows.cat(Int4Rows.encode(x[:, :, :3], g))
    torch.testing.assert_close(both.decode(torch.float32), torch.cat([want, want[:, :, :3]], dim=-2), rtol=0, atol=0)


def test_quant_settings_resolve_and_refuse_nonsense():
    from memwise_kvprune.api import _quant
    from memwise_kvprune.specs import FP8, Int4

    assert _quant(True) == FP8("e4m3") and _quant("e5m2") == FP8("e5m2") and _quant("int4") == Int4(16)
    assert _quant(None) is None and _quant(False) is None
    with pytest.raises(ValueError, match="quant must be"):
        _quant("int3")
    assert KVPrunePlugin(quant="int4", quant_group=32).cache_settings()["quant"] == Int4(32)
    with pytest.raises(memwise.RecipeError, match="quant_group"):
        KVPrunePlugin(quant="e4m3", quant_group=32)


def test_validate_warns_outside_the_measured_safe_range():
    from memwise_kvprune.safety import MEASURED

    safe = MEASURED[0]
    ctx = memwise.RunContext(stage="generate", model=tiny_llama())
    ok = KVPrunePlugin(think_ratio=safe.max_think, eviction="snapkv", budget=safe.min_snapkv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ok.memwise_validate(ctx=ctx) == []
    risky = KVPrunePlugin(think_ratio=0.75, eviction="snapkv", budget=0.2)
    with pytest.warns(UserWarning, match="think_ratio 0.75 is above") as caught:
        assert risky.memwise_validate(ctx=ctx) == []
    assert any("snapkv budget 0.2 is below" in str(w.message) for w in caught)
    assert KVPrunePlugin(eviction="streaming").warn_unsafe(135_000_000)[0].startswith("streaming eviction")
    assert risky.warn_unsafe(safe.max_params + 1) == []  # larger models: nothing measured, nothing said
