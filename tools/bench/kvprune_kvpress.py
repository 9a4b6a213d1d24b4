"""kvpress presses beside memwise_kvprune: on the recall model (tools/bench/kvprune.py) and on the real
model's pass-key retrieval prompts (tools/bench/kvprune_retrieval.py).

kvpress pins transformers < 5.3, so this script runs in its own virtual environment and
imports nothing from memwise; it reads the held-out MQAR set that ``kvprune.py recall``
saved, so both scripts score the same sequences with the same teacher-forced protocol:

    python3.11 -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0 && /tmp/kvpress-venv/bin/pip install kvpress
    python tools/bench/kvprune.py recall                          # writes runs/kvprune/bench/heldout.pt
    /tmp/kvpress-venv/bin/python tools/bench/kvprune_kvpress.py   # writes runs/kvprune/bench/kvpress.json
    python tools/bench/kvprune_retrieval.py prompts               # writes runs/kvprune/retrieval/prompts-L.pt
    /tmp/kvpress-venv/bin/python tools/bench/kvprune_kvpress.py retrieval --length 1024 [--quick]
    /tmp/kvpress-venv/bin/python tools/bench/kvprune_kvpress.py dump --length 1024   # kept tokens/channels

Retrieval: every press compresses the same prefill (one SDPA prefill per prompt; a forward
hook on each attention layer hands each press a copy of the layer's keys and values, as
kvpress's own hook would), then each press's cache is decoded greedily on its own, with
the exact-match rule of kvprune_retrieval.py. Bytes are those of the caches in bf16.

Bytes are what the DynamicCache holds after decoding. kvpress's ThinK zeroes pruned key
channels in place, so its bytes equal the unpruned cache's; that is the gap the memwise
cache closes. kvpress ``compression_ratio`` is the fraction of tokens removed
(memwise's eviction ``budget`` is the fraction kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch
from kvpress import ComposedPress, SnapKVPress, StreamingLLMPress, ThinKPress
from transformers import AutoTokenizer, DynamicCache, LlamaForCausalLM
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


RETRIEVAL_PRESSES = {
    "full": lambda: [],
    "think0.5": lambda: [ThinKPress(0.5, window_size=32)],
    "think0.25": lambda: [ThinKPress(0.25, window_size=32)],
    "snapkv0.5": lambda: [SnapKVPress(compression_ratio=0.5, window_size=32, kernel_size=7)],
    "snapkv0.3": lambda: [SnapKVPress(compression_ratio=0.7, window_size=32, kernel_size=7)],
    "think0.75": lambda: [ThinKPress(0.75, window_size=32)],
    "snapkv0.7": lambda: [SnapKVPress(compression_ratio=0.3, window_size=32, kernel_size=7)],
    "streaming0.5": lambda: [StreamingLLMPress(compression_ratio=0.5, n_sink=4)],
    "streaming0.7": lambda: [StreamingLLMPress(compression_ratio=0.3, n_sink=4)],
    "think0.5+snapkv0.5": lambda: [SnapKVPress(compression_ratio=0.5, window_size=32, kernel_size=7),
                                   ThinKPress(0.5, window_size=32)],
    "think0.5+snapkv0.3": lambda: [SnapKVPress(compression_ratio=0.7, window_size=32, kernel_size=7),
                                   ThinKPress(0.5, window_size=32)],
}
"""memwise setting names (snapkvB keeps B of the prompt) -> the kvpress presses applied in order."""


def decided(text: str, key: str) -> bool:
    """The same early stop as kvprune_retrieval.py: the first number ended, or it already differs."""
    match = re.search(r"\d+", text)
    return match is not None and (match.end() < len(text) or not key.startswith(match.group(0)))


def prefill_with_hook(model: LlamaForCausalLM, ids: list[int], hook: Any) -> Any:
    """One SDPA prefill of ``ids`` with ``hook`` on every attention layer (kwargs included), as kvpress's
    own press hook sits, so each press can compress a copy of the layer's keys and values."""
    hooks = []
    for layer in model.model.layers:
        layer.self_attn.rotary_emb = model.model.rotary_emb
        hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        return model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(config=model.config), use_cache=True)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def retrieval(args: argparse.Namespace) -> None:
    """Exact-match pass-key accuracy of each press on the prompts kvprune_retrieval.py saved."""
    data = torch.load(f"{args.prompts}/prompts-{args.length}.pt", weights_only=True)
    rows = data["rows"]
    if args.quick:  # one key per filler and depth
        rows = rows[::len(rows) // 10]
    rows = rows[:args.limit] if args.limit else rows
    rows = rows[::args.every]
    model = LlamaForCausalLM.from_pretrained(data["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(data["model"])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    names = args.settings
    presses = {n: RETRIEVAL_PRESSES[n]() for n in names}
    for chain in presses.values():
        for press in chain:
            press.post_init_from_model(model)
    caches: dict = {}

    def fan_out(module: torch.nn.Module, inputs: tuple, kwargs: dict, output: tuple) -> tuple:
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        for n, chain in presses.items():
            keys, values = layer.keys.clone(), layer.values.clone()
            for press in chain:
                keys, values = press.compress(module, kwargs["hidden_states"], keys, values, None, kwargs)
            caches[n].update(keys, values, module.layer_idx)
        return output

    hits: dict = {n: [] for n in names}
    answers: dict = {n: [] for n in names}
    nbytes: dict = {}
    start = time.time()
    for i, row in enumerate(rows):
        caches.clear()
        caches.update({n: DynamicCache(config=model.config) for n in names})
        out = prefill_with_hook(model, row["ids"], fan_out)
        key, length = str(row["key"]), len(row["ids"])
        for n in names:
            cache = caches[n]
            tokens = [int(out.logits[0, -1].argmax())]
            while len(tokens) < args.new and tokens[-1] != eos and not decided(tok.decode(tokens), key):
                # after eviction the cache holds fewer tokens than were seen: positions must say where we are
                t = length + len(tokens) - 1
                step = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True,
                             position_ids=torch.tensor([[t]]), cache_position=torch.tensor([t]))
                tokens.append(int(step.logits[0, -1].argmax()))
            text = tok.decode(tokens, skip_special_tokens=True)
            match = re.search(r"\d+", text)
            hits[n].append(match is not None and match.group(0) == key)
            answers[n].append(text)
            nbytes[n] = sum(t.numel() * 2 for layer in cache.layers for t in (layer.keys, layer.values))
        print(f"[{i + 1}/{len(rows)}] key {key} {row['kind']} depth {row['depth']}: "
              + " ".join(f"{n}={'+' if hits[n][-1] else '-'}" for n in names), flush=True)
    result = []
    for n in names:
        by = {}
        for kind in ("prose", "code"):
            sel = [h for h, r in zip(hits[n], rows) if r["kind"] == kind]
            by[kind] = round(100 * sum(sel) / len(sel), 1) if sel else None
        result.append({"setting": n, "presses": [repr(p) for p in presses[n]],
                       "accuracy": round(100 * sum(hits[n]) / len(rows), 1), **by,
                       "bytes_bf16_last": nbytes[n], "examples": answers[n][:3], "hits": [int(h) for h in hits[n]]})
        print(json.dumps({k: v for k, v in result[-1].items() if k not in ("examples", "hits")}), flush=True)
    import kvpress
    import transformers

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "seconds": round(time.time() - start, 1), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvpress": getattr(kvpress, "__version__", "?"),
            "quick": args.quick}
    subset = (("-quick" if args.quick else "") + (f"-every{args.every}" if args.every > 1 else "")
              + (f"-first{args.limit}" if args.limit else ""))
    out_path = Path(args.prompts) / f"kvpress-{args.length}{subset}{args.tag}.json"
    out_path.write_text(json.dumps({"prompts": len(rows), "tokens": len(rows[0]["ids"]), "rows": result,
                                    "meta": meta}, indent=1))


def decode_step_trace(model: LlamaForCausalLM, cache: DynamicCache, token: int, position: int) -> dict:
    """One greedy decode step through ``cache``: each layer's attention output and the logits."""
    outs: list = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, i, o: outs.append(o[0][0, -1].clone()))
             for layer in model.model.layers]
    try:
        step = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                     position_ids=torch.tensor([[position]]), cache_position=torch.tensor([position]))
    finally:
        for h in hooks:
            h.remove()
    return {"attention": torch.stack(outs), "logits": step.logits[0, -1].clone()}


@torch.no_grad()
def dump(args: argparse.Namespace) -> None:
    """For one prompt, what SnapKVPress (keeping 30%) and ThinKPress (0.5) do in each layer: the kept token
    indices (found by matching kept key rows against the layer's full keys), the pruned channels (the
    all-zero key columns), and, decoding the first answer token through each compressed cache, every
    layer's attention output and the logits (the full cache's too)."""
    data = torch.load(f"{args.prompts}/prompts-{args.length}.pt", weights_only=True)
    row = data["rows"][args.index]
    model = LlamaForCausalLM.from_pretrained(data["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    snap, think = SnapKVPress(compression_ratio=0.7, window_size=32, kernel_size=7), ThinKPress(0.5, window_size=32)
    for press in (snap, think):
        press.post_init_from_model(model)
    found: dict = {"tokens": [], "pruned_channels": []}
    caches = {n: DynamicCache(config=model.config) for n in ("full", "snapkv0.3", "think0.5")}

    def hook(module: torch.nn.Module, inputs: tuple, kwargs: dict, output: tuple) -> tuple:
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        full, values = layer.keys, layer.values
        caches["full"].update(full.clone(), values.clone(), module.layer_idx)
        kept, kept_v = snap.compress(module, kwargs["hidden_states"], full.clone(), values.clone(), None, kwargs)
        caches["snapkv0.3"].update(kept, kept_v, module.layer_idx)
        same = (kept[:, :, :, None, :] == full[:, :, None, :, :]).all(-1)  # [B, H, kept, L]
        found["tokens"].append(same.float().argmax(-1).sort(-1).values[0])
        zeroed, think_v = think.compress(module, kwargs["hidden_states"], full.clone(), values.clone(), None, kwargs)
        caches["think0.5"].update(zeroed, think_v, module.layer_idx)
        found["pruned_channels"].append(zeroed.eq(0).all(dim=2)[0])
        return output

    out = prefill_with_hook(model, row["ids"], hook)
    first = int(out.logits[0, -1].argmax())
    saved = {k: torch.stack(v) for k, v in found.items()}
    saved["first_token"] = torch.tensor(first)
    for name, cache in caches.items():
        trace = decode_step_trace(model, cache, first, len(row["ids"]))
        saved[f"{name}.attention"], saved[f"{name}.logits"] = trace["attention"], trace["logits"]
    torch.save(saved, Path(args.prompts) / f"kvpress-kept-{args.length}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="recall", choices=["recall", "retrieval", "dump"])
    parser.add_argument("--weights", default="runs/kvprune/recall/model")
    parser.add_argument("--heldout", default="runs/kvprune/bench/heldout.pt")
    parser.add_argument("--out", default="runs/kvprune/bench")
    parser.add_argument("--prompts", default="runs/kvprune/retrieval", help="retrieval: the prompts' folder")
    parser.add_argument("--length", type=int, default=1024, help="retrieval: prompt length")
    parser.add_argument("--settings", nargs="+", default=list(RETRIEVAL_PRESSES), help="retrieval: presses")
    parser.add_argument("--quick", action="store_true", help="retrieval: 10 prompts (one per filler and depth)")
    parser.add_argument("--limit", type=int, default=None, help="retrieval: first N prompts only")
    parser.add_argument("--every", type=int, default=1, help="retrieval: every N-th prompt (as kvprune_retrieval.py)")
    parser.add_argument("--new", type=int, default=16, help="retrieval: most tokens decoded per answer")
    parser.add_argument("--tag", default="", help="retrieval: appended to the result file's name")
    parser.add_argument("--index", type=int, default=0, help="dump: the prompt whose kept tokens are saved")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    if args.mode in ("retrieval", "dump"):
        (retrieval if args.mode == "retrieval" else dump)(args)
        return
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
