"""Shared pieces of the kvprune tests: a tiny seeded Llama and greedy decoding loops."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaForCausalLM
from memwise import testing

from memwise_kvprune.compat import cache_kwarg


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    model = testing.tiny_llama(layers=layers, seed=seed, max_position_embeddings=4096).eval()
    model.set_attn_implementation("sdpa")
    return model


def prompts(batch: int = 2, length: int = 40, pad: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random byte prompts; row 1 (when present) is left-padded by ``pad`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :pad] = 256
        mask[1, :pad] = 0
    return ids, mask


def generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: object,
             new: int = 6) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         pad_token_id=256, **{cache_kwarg(): cache})
    return out[:, ids.shape[1]:]


@torch.no_grad()
def greedy_loop(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: object, new: int = 6,
                after_prefill: object = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A hand-written decoding loop: prefill, then one token at a time; returns tokens and logits."""
    position = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                **{cache_kwarg("model"): cache})
    if after_prefill is not None:
        after_prefill(cache)
    tokens, logits = [], []
    for _ in range(new):
        last = out.logits[:, -1]
        logits.append(last)
        nxt = last.argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
        position = position[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=position, use_cache=True,
                **{cache_kwarg("model"): cache})
    return torch.cat(tokens, dim=-1), logits


def dynamic_cache(model: torch.nn.Module) -> DynamicCache:
    return DynamicCache(config=model.config)


def dynamic_nbytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
