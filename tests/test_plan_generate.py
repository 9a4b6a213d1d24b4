"""`memwise plan --stage generate`: predicted generation peak within 5% of MemTracker's measured peak
of ``generate`` with the plugins' caches (tiny model, SmolLM2), the 8B table against closed-form arithmetic, --write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from memwise import generation_plan, planner
from memwise.context import Workload
from memwise.testing import require_real_model, tiny_llama

kvprune = pytest.importorskip("memwise_kvprune")
from memwise_kvprune import KVPrunePlugin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "recipes" / "micro.yaml")
MODELS = ROOT / "recipes" / "models"


def _check(model: torch.nn.Module, settings: dict | None, batch: int, prompt: int, new: int) -> None:
    plugins = [] if settings is None else [KVPrunePlugin(**settings)]
    workload = Workload(batch, prompt, "32-true", max_new_tokens=new)
    on_model = generation_plan.estimate_generation(model, plugins, workload)
    meta = planner.meta_model(model.config.to_dict()).eval()
    on_meta = generation_plan.estimate_generation(meta, [type(p)(p.config) for p in plugins], workload)
    assert on_meta.peak == on_model.peak and on_meta.estimate == on_model.estimate  # meta counts are exact
    measured = generation_plan.measure_peak(model, plugins, workload)
    assert abs(on_model.peak - measured) <= 0.05 * measured, (on_model.peak, measured, on_model.estimate)


CACHES = [
    pytest.param(None, 1, 256, 32, id="dense"),
    pytest.param({}, 1, 256, 32, id="think"),
    pytest.param({"think_ratio": 0.0, "quant": "e4m3"}, 1, 256, 32, id="fp8"),
    pytest.param({"eviction": "snapkv", "budget": 0.7, "quant": "e4m3"}, 1, 256, 32, id="think-snapkv-fp8"),
    pytest.param(None, 2, 128, 16, id="dense-batch2"),
    pytest.param(None, 1, 32, 200, id="dense-long-generation"),
    pytest.param({"think_ratio": 0.0, "quant": "int4"}, 1, 256, 32, id="int4", marks=pytest.mark.slow),
    pytest.param({"think_ratio": 0.0, "eviction": "snapkv", "budget": 0.5}, 1, 512, 16, id="snapkv-512",
                 marks=pytest.mark.slow),
    pytest.param({"think_ratio": 0.0, "eviction": "streaming", "budget": 0.5}, 1, 256, 32, id="streaming",
                 marks=pytest.mark.slow),
    pytest.param({"quant": "e4m3"}, 1, 256, 32, id="think-fp8", marks=pytest.mark.slow),
    pytest.param({"think_ratio": 0.0, "eviction": "snapkv", "budget": 0.7, "quant": "int4"}, 2, 128, 16,
                 id="snapkv-int4-batch2", marks=pytest.mark.slow),
    pytest.param({"think_ratio": 0.0, "quant": "e4m3"}, 1, 32, 200, id="fp8-long-generation", marks=pytest.mark.slow),
]


@pytest.mark.slow
@pytest.mark.parametrize("settings, batch, prompt, new", CACHES)
def test_tiny_generation_peak_within_5_percent_of_measured(settings, batch, prompt, new):
    _check(tiny_llama().eval(), settings, batch, prompt, new)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [None, {"think_ratio": 0.0, "quant": "e4m3"},
                                      {"eviction": "snapkv", "budget": 0.7, "quant": "e4m3"}],
                         ids=["dense", "fp8", "think-snapkv-fp8"])
def test_real_model_generation_peak_within_5_percent(settings):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(require_real_model(), dtype=torch.float32).eval()
    _check(model, settings, 1, 256, 16)


def test_llama_31_8b_generation_table_matches_closed_form():
    target = planner.load_target(str(MODELS / "llama-3.1-8b.json"))
    target.seq_len, target.batch_size, target.precision = 4096, 1, "bf16-true"
    prompt, new = 4096, 1024
    budget = planner.parse_bytes("16.95GB")  # between the dense cache's peak and FP8's
    rows, _ = generation_plan.plan_generation(target, budget=budget, max_new_tokens=new)
    by_label = {r.label: r for r in rows}
    h, inter, layers, heads, kv, hd, vocab = 4096, 14336, 32, 32, 8, 128, 128256
    n = 2 * vocab * h + layers * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter + 2 * h) + h
    weights = 2 * n + 2 * 2 * hd // 2  # bf16, and the rotary inverse frequencies (and their original copy)
    final = prompt + new - 1  # the last new token is never fed back
    heads_all = layers * kv
    prefill_temps = prompt * ((4 * h + 3 * inter + 2 * hd) * 2 + 32)
    decode_extra = 2 * kv * hd * final * 2 + 16 * (final + 1)  # one layer's keys and values, the growing inputs

    def peak(kv_prompt: int, kv_end: int, transient: int = 0) -> int:
        return weights + max(kv_prompt + prefill_temps + transient, kv_end + decode_extra)

    dense = by_label["baseline"]
    assert dense.estimate.parameters == weights
    assert dense.estimate.kv_cache == heads_all * 2 * hd * 2 * final
    assert dense.prefill_kv == heads_all * 2 * hd * 2 * prompt
    assert dense.peak == peak(heads_all * 4 * hd * prompt, heads_all * 4 * hd * final)
    fp8 = by_label["kvprune(think_ratio=0.0, quant=e4m3)"]  # a byte per element and a bf16 scale per row
    assert fp8.estimate.kv_cache == heads_all * 2 * (hd + 2) * final
    assert fp8.peak == peak(heads_all * 2 * (hd + 2) * prompt, heads_all * 2 * (hd + 2) * final)
    int4 = by_label["kvprune(think_ratio=0.0, quant=int4)"]  # two elements a byte, a bf16 scale per 16
    assert int4.estimate.kv_cache == heads_all * 2 * (hd // 2 + 2 * hd // 16) * final
    think = by_label["kvprune"]  # the prompt's keys at half the channels, decoded keys full width, channel ids
    assert think.estimate.kv_cache == heads_all * (prompt * hd // 2 * 2 + (new - 1) * hd * 2 + final * hd * 2
                                                   + hd // 2)
    snap = by_label["kvprune(think_ratio=0.0, eviction=snapkv, budget=0.7, quant=int4)"]
    kept = -(-7 * prompt // 10)  # ceil(0.7 x prompt) tokens of the prompt, int16 positions
    row = hd // 2 + 2 * hd // 16
    assert snap.estimate.kv_cache == heads_all * (2 * row + 2) * (kept + new - 1)
    scores = prompt * prompt + heads * 32 * prompt * 4  # the causal mask and the observation window's scores
    assert snap.peak == peak(heads_all * (2 * row + 2) * kept, snap.estimate.kv_cache, scores)
    assert dense.peak > budget > fp8.peak and not dense.fits and fp8.fits
    assert rows.index(fp8) < rows.index(int4)  # at equal fit, the smaller quality cost first


@pytest.mark.slow
def test_generation_plan_writes_a_recipe_that_generate_validates(cli, tmp_path):
    out = tmp_path / "gen.yaml"
    code, text, err = cli("plan", MICRO, "--stage", "generate", "--budget", "2MiB", "--seq-len", "64",
                          "--max-new-tokens", "8", "--batch-size", "1", "--write", out)
    assert code == 0, err
    written = yaml.safe_load(out.read_text())
    assert written["generate"] == {"max_new_tokens": 8} and written["model"]["dtype"] == "float32"
    assert written["extends"] == [MICRO] and "kvprune" not in [p["use"] for p in written["plugins"]]  # dense fits
    code, _, err = cli("validate", out, "--stage", "generate")
    assert code == 0, err
    code, _, err = cli("plan", MICRO, "--stage", "generate", "--budget", "1KiB", "--write", tmp_path / "none.yaml")
    assert code == 2 and "no cache fits" in err
    code, _, err = cli("plan", MICRO, "--stage", "generate", "--budget", "1GiB", "--precision", "bf16-mixed")
    assert code == 2 and "bf16-true" in err
    code, _, err = cli("plan", MICRO, "--budget", "1GiB", "--max-new-tokens", "8")
    assert code == 2 and "--stage generate" in err
