"""KV-cache pruning benchmark: bytes against quality for ThinK, eviction, both, both + FP8.

    python tools/bench/kvprune.py bound                      # ThinK's saving vs r/2 x (1 - w/L), no training needed
    python tools/bench/kvprune.py recall [--weights PATH]    # curves on the recall.yaml model (held-out MQAR)
    memwise run recipes/baseline.yaml trainer.max_steps=300 report.save_model=true report.dir=runs/tiny
    python tools/bench/kvprune.py pystdlib --weights runs/tiny/model --seq-len 256 --prompt 192 --examples 64
                                                             # agreement and KL on held-out stdlib files
    python tools/bench/kvprune.py timing [--weights PATH]    # decode time per step, ratio to DynamicCache

Baseline: transformers' DynamicCache in bf16 (the model runs in bf16). Recall protocol: each
held-out MQAR sequence is cut at ``--prompt`` tokens; the prompt is prefilled (that is when
the cache is pruned), the rest is decoded teacher-forced one token at a time through the
cache, and recall is the accuracy on the answer tokens in the decoded part. Agreement and
KL compare each step's next-token distribution with the full cache's; loss is the
teacher-forced next-token loss (nats) over the decoded part. kvpress is not run
here: it pins transformers < 5.3, so ``tools/bench/kvprune_kvpress.py`` runs its presses in
their own virtual environment on the held-out set this script saves.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from memwise_kvprune import FP8, Eviction, ThinK, make_cache
from memwise_kvprune.compat import cache_kwarg

warnings.filterwarnings("ignore", category=FutureWarning)
DEFAULT_WEIGHTS = "runs/kvprune/recall/model"


def dense_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def bound(args: argparse.Namespace) -> list[dict]:
    """Prefill a long prompt into a ThinK cache and compare the saving with its bound."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=512, vocab_size=260, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    rows = []
    for length in (1024, 2048, 4096):
        ids = torch.randint(0, 256, (1, length))
        for ratio in (0.25, 0.5, 0.75):
            window = 32
            cache = make_cache(model, think=ThinK(ratio, window=window))
            dense = DynamicCache(config=config)
            with torch.no_grad():
                model(input_ids=ids, use_cache=True, **{cache_kwarg("model"): cache})
                model(input_ids=ids, use_cache=True, **{cache_kwarg("model"): dense})
            saving = 1 - cache.nbytes() / dense_bytes(dense)
            limit = ratio / 2 * (1 - window / length)
            rows.append({"L": length, "ratio": ratio, "window": window, "bytes": cache.nbytes(),
                         "dynamic_bf16_bytes": dense_bytes(dense), "saving": round(saving, 5),
                         "bound": round(limit, 5), "gap_points": round(100 * (limit - saving), 3)})
    return rows


def load_recall_model(path: str, recipe: str) -> LlamaForCausalLM:
    """The recall model: a HF folder, or a memwise checkpoint with its recipe's model config."""
    p = Path(path)
    if p.is_dir():
        model = LlamaForCausalLM.from_pretrained(p)
    else:
        from memwise.checkpoint import safe_load
        from memwise.recipe import load

        fields = load(recipe).config.model.config
        model = LlamaForCausalLM(LlamaConfig(vocab_size=260, **fields))
        state = safe_load(p)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    model.set_attn_implementation("sdpa")
    return model.to(torch.bfloat16).eval()


def held_out(n: int, seq_len: int, pairs: int, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    from memwise.data.mqar import make_mqar

    items = make_mqar(n, seq_len, pairs, num_queries=queries, seed=4242)  # training uses seeds 1 and 2
    ids = torch.tensor(np.stack([t for t, _ in items]), dtype=torch.long)
    targets = torch.tensor(np.stack([m for _, m in items]))
    return ids, targets


@torch.no_grad()
def decode_teacher_forced(model: LlamaForCausalLM, ids: torch.Tensor, prompt: int, cache: object) -> torch.Tensor:
    """Log-probabilities [B, T - prompt, V] of tokens prompt..T-1, each predicted from the cache."""
    key = cache_kwarg("model")
    out = model(input_ids=ids[:, :prompt], use_cache=True, **{key: cache})
    logps = [out.logits[:, -1].float().log_softmax(-1)]
    for t in range(prompt, ids.shape[1] - 1):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{key: cache})
        logps.append(out.logits[:, -1].float().log_softmax(-1))
    return torch.stack(logps, dim=1)


def settings_grid(window: int) -> list[tuple[str, dict]]:
    think = lambda r: ThinK(r, window=window, observe=window, fold_every=window)  # noqa: E731
    snap = lambda b: Eviction("snapkv", b, observe=window)  # noqa: E731
    grid = [("think", {"think": think(r)}) for r in (0.25, 0.5, 0.75)]
    grid += [("snapkv", {"eviction": snap(b)}) for b in (0.75, 0.5, 0.3, 0.2)]
    grid += [("streaming", {"eviction": Eviction("streaming", b, sinks=4)}) for b in (0.75, 0.5)]
    grid += [("think+snapkv", {"think": think(0.5), "eviction": snap(b)}) for b in (0.75, 0.5)]
    grid += [("think+snapkv+fp8", {"think": think(r), "eviction": snap(b), "quant": FP8()})
             for r, b in ((0.5, 1.0), (0.5, 0.5), (0.5, 0.4), (0.5, 0.3), (0.5, 0.2), (0.25, 0.3), (0.75, 0.5))]
    grid += [("fp8", {"quant": FP8()})]
    return grid


def curves(model: LlamaForCausalLM, ids: torch.Tensor, prompt: int, answer: torch.Tensor | None,
           window: int) -> list[dict]:
    """Bytes, recall (on ``answer`` positions, if given), agreement and KL for every setting."""
    truth = ids[:, prompt:]

    def score(logp: torch.Tensor) -> float | None:
        if answer is None:
            return None
        return round((logp.argmax(-1)[answer] == truth[answer]).float().mean().item(), 4)

    def nll(logp: torch.Tensor) -> float:
        return round(-logp.gather(-1, truth[..., None]).mean().item(), 4)

    dense = DynamicCache(config=model.config)
    base = decode_teacher_forced(model, ids, prompt, dense)
    base_bytes = dense_bytes(dense)
    rows = [{"method": "DynamicCache bf16", "settings": "", "bytes": base_bytes, "fraction": 1.0,
             "recall": score(base), "agreement": 1.0, "kl": 0.0, "loss": nll(base)}]
    for name, settings in settings_grid(window):
        cache = make_cache(model, **settings)
        logp = decode_teacher_forced(model, ids, prompt, cache)
        kl = (base.exp() * (base - logp)).sum(-1).mean().item()
        agree = (logp.argmax(-1) == base.argmax(-1)).float().mean().item()
        short = {"think": "r={ratio} w={window} fold={fold_every}", "eviction": "{policy} budget={budget}",
                 "quant": "{format}"}
        desc = "; ".join(short[k].format(**vars(v)) for k, v in settings.items())
        rows.append({"method": name, "settings": desc, "bytes": cache.nbytes(),
                     "fraction": round(cache.nbytes() / base_bytes, 4), "recall": score(logp),
                     "agreement": round(agree, 4), "kl": round(kl, 5), "loss": nll(logp)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def recall(args: argparse.Namespace) -> list[dict]:
    model = load_recall_model(args.weights, args.recipe)
    ids, targets = held_out(args.examples, args.seq_len, args.pairs, args.queries)
    Path(args.out).mkdir(parents=True, exist_ok=True)  # the same set for tools/bench/kvprune_kvpress.py
    torch.save({"ids": ids, "answer": targets[:, args.prompt:], "prompt": args.prompt, "window": args.window},
               Path(args.out) / "heldout.pt")
    return curves(model, ids, args.prompt, targets[:, args.prompt:], args.window)


def pystdlib(args: argparse.Namespace) -> list[dict]:
    """Teacher-forced agreement and KL on held-out stdlib files (a model trained by recipes/base/tiny.yaml)."""
    from memwise.data.corpus import from_documents
    from memwise.data.documents import pystdlib_documents
    from memwise.data.tokens import ByteTokenizer

    model = load_recall_model(args.weights, args.recipe)
    corpus = from_documents(pystdlib_documents("file"), ByteTokenizer(), 5.0, 0, 400)
    docs = [d[:args.seq_len] for d in corpus.val if len(d) >= args.seq_len][:args.examples]
    ids = torch.tensor(np.stack(docs), dtype=torch.long)
    return curves(model, ids, args.prompt, None, args.window)


def timing(args: argparse.Namespace) -> list[dict]:
    """Decode step time of the pruned cache as a ratio to DynamicCache, interleaved, median of 7."""
    model = load_recall_model(args.weights, args.recipe)
    ids, _ = held_out(args.examples, args.seq_len, args.pairs, args.queries)
    think = ThinK(0.5, window=args.window, observe=args.window, fold_every=args.window)
    grid = [("DynamicCache", None), ("think 0.5", {"think": think}),
            ("think 0.5 + snapkv 0.3 + fp8", {"think": think, "eviction": Eviction("snapkv", 0.3, observe=args.window),
                                              "quant": FP8()})]
    times: dict[str, list[float]] = {name: [] for name, _ in grid}
    for rep in range(8):
        for name, settings in grid:
            cache = DynamicCache(config=model.config) if settings is None else make_cache(model, **settings)
            start = time.perf_counter()
            decode_teacher_forced(model, ids, args.prompt, cache)
            if rep:  # the first round is warm-up
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["DynamicCache"])
    return [{"method": name, "median_s": round(statistics.median(t), 4),
             "ratio_to_dynamic": round(statistics.median(t) / base, 3)} for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["bound", "recall", "pystdlib", "timing"])
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--recipe", default="recipes/kvprune/recall.yaml", help="model config for a .ckpt")
    parser.add_argument("--seq-len", type=int, default=320)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--window", type=int, default=32, help="ThinK full-width window and observation windows")
    parser.add_argument("--out", default="runs/kvprune/bench")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = {"bound": bound, "recall": recall, "pystdlib": pystdlib, "timing": timing}[args.what](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "args": vars(args)}
    (out / f"{args.what}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
