"""kvpress presses on the recall model, for comparison with memwise_kvprune (tools/bench/kvprune.py).

kvpress pins transformers < 5.3, so this script runs in its own virtual environment and
imports nothing from memwise; it reads the held-out MQAR set that ``kvprune.py recall``
saved, so both scripts score the same sequences with the same teacher-forced protocol:

    python3.11 -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0 && /tmp/kvpress-venv/bin/pip install kvpress
    python tools/bench/kvprune.py recall                          # writes runs/kvprune/bench/heldout.pt
    /tmp/kvpress-venv/bin/python tools/bench/kvprune_kvpress.py   # writes runs/kvprune/bench/kvpress.json

Bytes are what the DynamicCache holds after decoding. kvpress's ThinK zeroes pruned key
channels in place, so its bytes equal the unpruned cache's; that is the gap the memwise
cache closes. kvpress ``compression_ratio`` is the fraction of tokens removed
(memwise's eviction ``budget`` is the fraction kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from kvpress import ComposedPress, SnapKVPress, StreamingLLMPress, ThinKPress
from transformers import DynamicCache, LlamaForCausalLM
from transformers.utils import logging as hf_logging


def cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def decode(model: LlamaForCausalLM, ids: torch.Tensor, prompt: int, press: object | None) -> tuple[torch.Tensor, int]:
    """Log-probabilities of tokens prompt..T-1 (prefill under the press, then one token at a time)."""
    cache = DynamicCache(config=model.config)
    if press is None:
        out = model(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True)
    else:
        with press(model):
            out = model(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True)
    logps = [out.logits[:, -1].float().log_softmax(-1)]
    for t in range(prompt, ids.shape[1] - 1):
        position = torch.full((ids.shape[0], 1), t)
        out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, position_ids=position,
                    cache_position=torch.tensor([t]), use_cache=True)
        logps.append(out.logits[:, -1].float().log_softmax(-1))
    return torch.stack(logps, dim=1), cache_bytes(cache)


def presses(window: int) -> list[tuple[str, str, object | None]]:
    snap = lambda removed: SnapKVPress(compression_ratio=removed, window_size=window, kernel_size=7)  # noqa: E731
    rows: list[tuple[str, str, object | None]] = [("DynamicCache bf16", "", None)]
    rows += [("kvpress ThinK", f"key_channel_compression_ratio={r}", ThinKPress(r, window_size=window))
             for r in (0.25, 0.5)]
    rows += [("kvpress SnapKV", f"compression_ratio={c}", snap(c)) for c in (0.5, 0.7, 0.8)]
    rows += [("kvpress StreamingLLM", "compression_ratio=0.5", StreamingLLMPress(compression_ratio=0.5, n_sink=4))]
    rows += [("kvpress SnapKV+ThinK", f"compression_ratio={c}; key_channel_compression_ratio=0.5",
              ComposedPress([snap(c), ThinKPress(0.5, window_size=window)])) for c in (0.5, 0.7)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="runs/kvprune/recall/model")
    parser.add_argument("--heldout", default="runs/kvprune/bench/heldout.pt")
    parser.add_argument("--out", default="runs/kvprune/bench")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    held = torch.load(args.heldout, weights_only=True)
    ids, answer, prompt, window = held["ids"], held["answer"], int(held["prompt"]), int(held["window"])
    model = LlamaForCausalLM.from_pretrained(args.weights, attn_implementation="sdpa").to(torch.bfloat16).eval()
    truth = ids[:, prompt:]
    base, base_bytes = decode(model, ids, prompt, None)
    rows = []
    for method, settings, press in presses(window):
        logp, nbytes = (base, base_bytes) if press is None else decode(model, ids, prompt, press)
        rows.append({"method": method, "settings": settings, "bytes": nbytes,
                     "fraction": round(nbytes / base_bytes, 4),
                     "recall": round((logp.argmax(-1)[answer] == truth[answer]).float().mean().item(), 4),
                     "agreement": round((logp.argmax(-1) == base.argmax(-1)).float().mean().item(), 4),
                     "kl": round((base.exp() * (base - logp)).sum(-1).mean().item(), 5),
                     "loss": round(-logp.gather(-1, truth[..., None]).mean().item(), 4)})
        print(json.dumps(rows[-1]), flush=True)
    import kvpress
    import transformers

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "kvpress": getattr(kvpress, "__version__", "?"), "args": vars(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kvpress.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
