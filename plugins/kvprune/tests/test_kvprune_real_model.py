"""Regression tests on the real model (SmolLM2-135M-Instruct, its tokenizer and chat template).

Skipped with a reason when the model is absent (``make model`` fetches it; CI does).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from memwise.testing import require_real_model
from memwise_kvprune import Eviction, ThinK, pruned_generation
from memwise_kvprune.compat import cache_kwarg

warnings.filterwarnings("ignore", category=FutureWarning)
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "The river runs to the sea. A bird sings in the old oak tree. The bread is warm and the tea is hot. ")


@pytest.fixture(scope="module")
def real():
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = require_real_model()
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    return model, AutoTokenizer.from_pretrained(folder)


def chat_ids(tok, text: str) -> torch.Tensor:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    return torch.tensor([ids])


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new: int, **settings) -> list[int]:
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=new, do_sample=False, pad_token_id=2, attention_mask=mask)
    if not settings:
        return model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
    with pruned_generation(model, **settings) as cache:
        return model.generate(ids, **kwargs, **{cache_kwarg(): cache})[0, ids.shape[1]:].tolist()


@pytest.mark.slow
def test_snapkv_on_a_prompt_within_the_window_keeps_the_full_cache_answer(real):
    """The shipped generate recipe's failure: a prompt no longer than the observation window lost its
    first tokens (BOS included) and the model answered "fibonacci fibonacci ...". Now it is kept whole."""
    model, tok = real
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    assert ids.shape[1] < 32
    full = greedy(model, ids, 8)
    assert greedy(model, ids, 8, think=ThinK(0.5), eviction=Eviction("snapkv", 0.6), quant=True) == full


@pytest.fixture(scope="module")
def pass_key(real):
    """A pass key in ~600 tokens of filler, asked under the chat template; the full cache answers it."""
    model, tok = real
    text = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the pass key.\n\n" + FILLER * 5
            + " The pass key is 48213. Remember it. 48213 is the pass key. " + FILLER * 5
            + "\n\nWhat is the pass key? Answer with the number only.")
    ids = chat_ids(tok, text)
    assert 500 < ids.shape[1] < 800
    full = tok.decode(greedy(model, ids, 10))
    assert re.search(r"\d+", full).group(0) == "48213", full
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("settings", [dict(think=0.5), dict(eviction=Eviction("snapkv", 0.5)), dict(quant=True)],
                         ids=["think0.5", "snapkv0.5", "fp8"])
def test_pass_key_survives_pruning_on_a_chat_prompt(real, pass_key, settings):
    """The settings measured to keep retrieval on this model answer the pass key like the full cache."""
    model, tok = real
    answer = tok.decode(greedy(model, pass_key, 10, **settings))
    assert re.search(r"\d+", answer).group(0) == "48213", answer


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    dict(think=ThinK(0.5), quant="int4"),  # 16-channel scale groups
    dict(think=ThinK(0.5), eviction=Eviction("snapkv", 0.5), quant="e4m3"),
], ids=["think0.5+int4", "think0.5+snapkv0.5+fp8"])
def test_pass_key_survives_a_composition_at_4x_fewer_bytes(real, pass_key, settings):
    """The compositions measured at >= 4x fewer bytes than the bf16 full cache within 10 points of its
    retrieval accuracy answer the pass key like the full cache, and hold >= 4x fewer bytes here too."""
    model, tok = real
    answer = tok.decode(greedy(model, pass_key, 10, **settings))
    assert re.search(r"\d+", answer).group(0) == "48213", answer
    from memwise_kvprune import make_cache, predict_nbytes

    cache = make_cache(model, install=False, **settings)
    cfg, prompt = model.config, pass_key.shape[1]
    shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, prompt, 9)
    pruned = predict_nbytes(*shape, cache.think, cache.eviction, cache.quant, dtype_bytes=2)
    assert predict_nbytes(*shape, dtype_bytes=2) >= 4 * pruned
