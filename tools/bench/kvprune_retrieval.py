"""Long-context retrieval on the real model: a pass key hidden in filler, exact match, greedy decoding.

    python tools/bench/kvprune_retrieval.py prompts --lengths 1024 2048 4096   # runs/kvprune/retrieval/prompts-L.pt
    python tools/bench/kvprune_retrieval.py eval --length 1024 [--quick] [--settings full think0.5 ...]
    python tools/bench/kvprune_retrieval.py timing --length 1024      # decode tokens/s against the full cache
    python tools/bench/kvprune_retrieval.py compare --length 1024     # kept tokens/channels beside kvpress's dump
    python tools/bench/kvprune_retrieval.py table --length 1024       # markdown: memwise beside kvpress
    /tmp/kvpress-venv/bin/python tools/bench/kvprune_kvpress.py retrieval --length 1024   # kvpress, same prompts

Each prompt is SmolLM2-135M-Instruct's chat template around one user message: an
instruction, filler (prose sentences or Python standard-library source) with the needle
"The pass key is NNNNN. Remember it. NNNNN is the pass key." at a depth (0.1 .. 0.9 of the
filler), and the question. The answer is correct when the first number in the greedy
reply (up to ``--new`` tokens) is the key. Prompts: 2 fillers x 5 depths x ``--keys`` keys
per length, seeded, so memwise and kvpress read the same token ids.

Every setting is decoded from one shared prefill per prompt: the prefill's attention is
exact in every setting (compression happens after each layer's own attention), so a
fan-out cache runs SDPA once per layer and lets each setting's cache compress the same
keys, values and queries. Bytes are those of the same cache in bf16 (the model runs in
fp32 on CPU), from :func:`memwise_kvprune.predict_nbytes`, against a bf16 DynamicCache.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, DynamicCache, LlamaForCausalLM
from transformers.cache_utils import Cache, CacheLayerMixin

from memwise_kvprune import FP8, Eviction, Int4, ThinK, make_cache, predict_nbytes
from memwise_kvprune.attention import pruned_attention
from memwise.attention import register_attention, set_attention_implementation
from memwise_kvprune.compat import cache_kwarg, sdpa_forward
from memwise_kvprune.layer import PrunedView

warnings.filterwarnings("ignore", category=FutureWarning)
OUT = Path("runs/kvprune/retrieval")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
INSTRUCTION = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the pass key.\n\n")
QUESTION = "\n\nWhat is the pass key? Answer with the number only."
PROSE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
         "The river runs to the sea. A bird sings in the old oak tree. The bread is warm and the tea is hot. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."


def stdlib_code() -> str:
    """Python source of the standard library (sorted files, no site-packages): real code, offline."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files[:60])


class PromptBuilder:
    """Builds prompts in token space (the template, instruction and question tokenized once), so a sweep
    of hundreds of prompts costs one tokenization of the filler, not one per prompt."""

    def __init__(self, tok: Any) -> None:
        marker = "\x00"
        text = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                       tokenize=False)
        pre, post = text.split(marker)
        self.tok = tok
        self.head = tok.encode(pre + INSTRUCTION, add_special_tokens=False)
        self.tail = tok.encode(QUESTION + post, add_special_tokens=False)
        self.pieces: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def build(self, filler: list[int], kind: str, depth: float, key: int, length: int) -> list[int]:
        """``length`` token ids: the needle after the sentence (prose) or line (code) nearest ``depth``."""
        needle = NEEDLE.format(key=key)
        needle_ids = self.encode(f"# {needle}\n" if kind == "code" else f" {needle}")
        body = filler[:length - len(self.head) - len(self.tail) - len(needle_ids)]
        end = "\n" if kind == "code" else "."
        cut = int(len(body) * depth)
        while cut > 0 and end not in self.piece(body[cut - 1]):
            cut -= 1
        return self.head + body[:cut] + needle_ids + body[cut:] + self.tail

    def piece(self, token: int) -> str:
        if token not in self.pieces:
            self.pieces[token] = self.tok.decode([token])
        return self.pieces[token]


def make_prompts(model_dir: Path, length: int, keys: int, seed: int = 0) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    builder = PromptBuilder(tok)
    rng = random.Random(seed + length)
    code = builder.encode(stdlib_code())
    prose = builder.encode(PROSE * (length * 6 // len(PROSE.split()) + 2))
    rows = []
    for kind, filler in (("prose", prose), ("code", code)):
        for depth in DEPTHS:
            for _ in range(keys):
                key = rng.randint(10000, 99999)
                start = rng.randrange(0, len(code) - length) if kind == "code" else 0
                while kind == "code" and start > 0 and "\n" not in builder.piece(filler[start - 1]):
                    start -= 1  # start the code at a line
                rows.append({"kind": kind, "depth": depth, "key": key,
                             "ids": builder.build(filler[start:], kind, depth, key, length)})
    return {"length": length, "model": str(model_dir), "rows": rows}


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return None if match is None else match.group(0)


def decided(text: str, key: str) -> bool:
    """The exact-match verdict cannot change any more: the first number ended, or it already differs."""
    match = re.search(r"\d+", text)
    return match is not None and (match.end() < len(text) or not key.startswith(match.group(0)))


# --- one prefill, every setting -----------------------------------------------------------


class FanOutLayer(CacheLayerMixin):
    """Prefill-only layer: hands the prompt's keys to each setting's layer (and a dense copy)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, members: list, dense: DynamicCache, index: int) -> None:
        super().__init__()
        self.members, self.dense, self.index = members, dense, index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        self.dense.update(key_states, value_states, self.index)
        views = [m.update(key_states, value_states)[0] for m in self.members]
        return FanOutView(views, key_states, value_states), None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class FanOutView:
    def __init__(self, views: list[PrunedView], keys: torch.Tensor, values: torch.Tensor) -> None:
        self.views, self.keys, self.values = views, keys, values


def fanout_attention(module: torch.nn.Module, query: torch.Tensor, key: Any, value: Any, attention_mask: Any,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple:
    """SDPA once on the prompt, then every setting's layer compresses with the same queries."""
    if not isinstance(key, FanOutView):
        return pruned_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = sdpa_forward()(module, query, key.keys, key.values, attention_mask, dropout=dropout, scaling=scaling,
                         **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    for view in key.views:
        view.layer.compress(view, query, attention_mask, scale)
    return out


class FanOutCache(Cache):
    def __init__(self, caches: list, dense: DynamicCache) -> None:
        n = len(dense.layers) if dense.layers else len(caches[0].layers)
        super().__init__(layers=[FanOutLayer([c.layers[i] for c in caches], dense, i) for i in range(n)])


# --- settings ---------------------------------------------------------------------------


def setting(name: str) -> dict:
    """``full``, ``think0.5``, ``snapkv0.3`` (budget kept), ``streaming0.5``, ``fp8``, ``int4[gN]`` (groups
    of 32 unless N), joined with ``+``; suffixes set options: ``think0.5w32`` ThinK's full-width window,
    ``snapkv0.5s0k15o64`` the eviction's sinks, pooling kernel and observation window."""
    spec: dict = {}
    for part in name.split("+"):
        if part == "full":
            continue
        if part == "fp8":
            spec["quant"] = FP8("e4m3")
            continue
        if re.fullmatch(r"int4(g\d+)?", part):
            spec["quant"] = Int4(int(part[5:])) if len(part) > 4 else Int4(32)
            continue
        match = re.fullmatch(r"(think|snapkv|streaming)([0-9.]*[0-9])((?:[wsko]\d+)*)", part)
        if match is None:
            raise SystemExit(f"unknown setting part {part!r} in {name!r}: use full, fp8, int4[gN], thinkR[wN], "
                             "snapkvB[sN][kN][oN], streamingB[sN]")
        kind, value, extra = match.groups()
        options = {OPTION_LETTERS[k]: int(v) for k, v in re.findall(r"([wsko])(\d+)", extra)}
        try:
            if kind == "think":
                spec["think"] = ThinK(float(value), **options)
            else:
                spec["eviction"] = Eviction(kind, float(value), **options)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"setting part {part!r}: {err}") from err
    return spec


OPTION_LETTERS = {"w": "window", "s": "sinks", "k": "kernel", "o": "observe"}
DEFAULT_SETTINGS = ["full", "fp8", "think0.5", "snapkv0.5", "snapkv0.3", "streaming0.5", "think0.5+snapkv0.5+fp8",
                    "think0.5+snapkv0.3+fp8"]


def bf16_bytes(cfg: Any, spec: dict, prompt: int, decoded: int) -> int:
    return predict_nbytes(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, prompt, decoded,
                          spec.get("think"), spec.get("eviction"), spec.get("quant"), dtype_bytes=2)


@torch.no_grad()
def greedy(model: LlamaForCausalLM, tok: Any, first: torch.Tensor, cache: Any, new: int, key: str) -> str:
    """Greedy reply after the prefill's last logits ``first``, one token at a time through ``cache``;
    stops at ``<|im_end|>``, after ``new`` tokens or once the verdict is decided."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tokens = [int(first.argmax())]
    while len(tokens) < new and tokens[-1] != eos and not decided(tok.decode(tokens), key):
        out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{cache_kwarg("model"): cache})
        tokens.append(int(out.logits[0, -1].argmax()))
    return tok.decode(tokens, skip_special_tokens=True)


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, tok: Any, data: dict, names: list[str], new: int, limit: int | None,
             log: Any = None) -> dict:
    """Accuracy and bf16 bytes per setting over the prompts (every setting from one shared prefill)."""
    cfg = model.config
    register_attention("memwise_kvprune_fanout", fanout_attention)
    specs = {n: setting(n) for n in names}
    rows = data["rows"][:limit] if limit else data["rows"]
    hits = {n: [] for n in names}
    answers = {n: [] for n in names}
    for i, row in enumerate(rows):
        ids = torch.tensor([row["ids"]])
        caches = {n: make_cache(model, install=False, **s) for n, s in specs.items() if s}
        dense = DynamicCache(config=cfg)
        set_attention_implementation(model, "memwise_kvprune_fanout")
        out = model(input_ids=ids, use_cache=True, **{cache_kwarg("model"): FanOutCache(list(caches.values()), dense)})
        for n in names:
            cache = caches.get(n, dense)
            text = greedy(model, tok, out.logits[0, -1], cache, new, str(row["key"]))
            answers[n].append(text)
            hits[n].append(first_number(text) == str(row["key"]))
        if log:
            log(f"[{i + 1}/{len(rows)}] key {row['key']} {row['kind']} depth {row['depth']}: "
                + " ".join(f"{n}={'+' if hits[n][-1] else '-'}" for n in names))
    length = len(rows[0]["ids"])
    dense_bytes = bf16_bytes(cfg, {}, length, new)
    result = []
    for n in names:
        nbytes = bf16_bytes(cfg, specs[n], length, new)
        by = {}
        for kind in ("prose", "code"):
            sel = [h for h, r in zip(hits[n], rows) if r["kind"] == kind]
            by[kind] = round(100 * sum(sel) / len(sel), 1) if sel else None
        result.append({"setting": n, "accuracy": round(100 * sum(hits[n]) / len(rows), 1), **by,
                       "bytes_bf16": nbytes, "x_fewer": round(dense_bytes / nbytes, 2),
                       "examples": answers[n][:3], "hits": [int(h) for h in hits[n]]})
    return {"prompts": len(rows), "tokens": length, "rows": result}


@torch.no_grad()
def timing(model: LlamaForCausalLM, ids: list[int], names: list[str], steps: int, reps: int) -> list[dict]:
    """Decode tokens/s of each setting against the full cache: one shared prefill, then for each of
    ``reps`` rounds every setting decodes ``steps`` tokens from a copy of its prefilled cache, in turn
    (A B C A B C ...); the first round is warm-up, the figure is the median round.

    Both clocks are reported: wall time, and the process's CPU time, which on a shared machine
    leaves out the time other jobs held the cores (with one thread, the two agree when idle).
    """
    import copy
    import statistics

    register_attention("memwise_kvprune_fanout", fanout_attention)
    specs = {n: setting(n) for n in names}
    caches = {n: make_cache(model, install=False, **s) for n, s in specs.items() if s}
    dense = DynamicCache(config=model.config)
    set_attention_implementation(model, "memwise_kvprune_fanout")
    fan_out = FanOutCache(list(caches.values()), dense)
    model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_kwarg("model"): fan_out})
    feed = torch.randint(0, model.config.vocab_size, (steps,), generator=torch.Generator().manual_seed(0))
    times: dict = {n: [] for n in names}
    cpu: dict = {n: [] for n in names}
    for rep in range(reps + 1):
        for n in names:
            cache = copy.deepcopy(caches.get(n, dense))
            start, start_cpu = time.perf_counter(), time.process_time()
            for t in feed:
                model(input_ids=t.view(1, 1), use_cache=True, **{cache_kwarg("model"): cache})
            if rep:
                times[n].append(time.perf_counter() - start)
                cpu[n].append(time.process_time() - start_cpu)
    base, base_cpu = statistics.median(times[names[0]]), statistics.median(cpu[names[0]])
    return [{"setting": n, "tokens_per_s": round(steps / statistics.median(times[n]), 2),
             "x_full": round(base / statistics.median(times[n]), 3),
             "x_full_cpu": round(base_cpu / statistics.median(cpu[n]), 3)} for n in names]


def decode_step_trace(model: LlamaForCausalLM, cache: Any, token: int) -> dict:
    """One greedy decode step through ``cache``: each layer's attention output and the logits."""
    outs: list = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, i, o: outs.append(o[0][0, -1].clone()))
             for layer in model.model.layers]
    try:
        step = model(input_ids=torch.tensor([[token]]), use_cache=True, **{cache_kwarg("model"): cache})
    finally:
        for h in hooks:
            h.remove()
    return {"attention": torch.stack(outs), "logits": step.logits[0, -1].clone()}


def _closeness(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Relative L2 distance and cosine of two vectors."""
    ours, theirs = ours.double().flatten(), theirs.double().flatten()
    return {"rel_l2": float((ours - theirs).norm() / theirs.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(ours, theirs, dim=0))}


@torch.no_grad()
def compare(model: LlamaForCausalLM, ids: list[int], theirs: dict) -> dict:
    """memwise's SnapKV (keeping 30%) and ThinK 0.5 beside kvpress's on the same prompt, layer by layer: the
    kept-token Jaccard index and kept-channel overlap (means over KV heads), then, decoding the first answer
    token through each compressed cache, each layer's attention output (relative L2 distance to kvpress's)
    and the logits (distance, same argmax, top-10 overlap); the full caches' row is the control."""
    register_attention("memwise_kvprune_fanout", fanout_attention)
    caches = {"snapkv0.3": make_cache(model, install=False, eviction=Eviction("snapkv", 0.3)),
              "think0.5": make_cache(model, install=False, think=ThinK(0.5))}
    dense = DynamicCache(config=model.config)
    set_attention_implementation(model, "memwise_kvprune_fanout")
    out = model(input_ids=torch.tensor([ids]), use_cache=True,
                **{cache_kwarg("model"): FanOutCache(list(caches.values()), dense)})
    first = int(out.logits[0, -1].argmax())
    if first != int(theirs["first_token"]):
        raise SystemExit(f"the prefill's first token differs: memwise {first}, kvpress {int(theirs['first_token'])}")
    layers = []
    for i, (s_layer, t_layer) in enumerate(zip(caches["snapkv0.3"].layers, caches["think0.5"].layers)):
        ours = s_layer.positions[0].long()
        jaccard = [len(set(a) & set(b)) / len(set(a) | set(b))
                   for a, b in zip(ours.tolist(), theirs["tokens"][i].tolist())]
        kept = ~theirs["pruned_channels"][i]  # [H, D]
        channels = [len(set(c) & set(kept[h].nonzero().flatten().tolist())) / len(c)
                    for h, c in enumerate(t_layer.channels[0].long().tolist())]
        layers.append({"layer": i, "snapkv_token_jaccard": round(sum(jaccard) / len(jaccard), 3),
                       "think_channel_overlap": round(sum(channels) / len(channels), 3)})
    decode, traces = {}, {}
    for name, cache in (("full", dense), *caches.items()):
        trace = traces[name] = decode_step_trace(model, cache, first)
        mine, ref = trace["logits"], theirs[f"{name}.logits"]
        decode[name] = {"logits": {**_closeness(mine, ref), "same_argmax": int(mine.argmax()) == int(ref.argmax()),
                                   "top10_overlap": len(set(mine.topk(10).indices.tolist())
                                                        & set(ref.topk(10).indices.tolist())) / 10},
                        "memwise_vs_its_full_rel_l2": round(_closeness(mine, traces["full"]["logits"])["rel_l2"], 6),
                        "kvpress_vs_its_full_rel_l2": round(_closeness(ref, theirs["full.logits"])["rel_l2"], 6),
                        "attention_rel_l2": [round(_closeness(a, b)["rel_l2"], 6)
                                             for a, b in zip(trace["attention"], theirs[f"{name}.attention"])]}
    return {"layers": layers, "decode": decode}


def suffix(quick: bool, every: int, limit: int | None = None) -> str:
    """The result files' name part for a subset of the prompts."""
    return ("-quick" if quick else "") + (f"-every{every}" if every > 1 else "") + (f"-first{limit}" if limit else "")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(out: Path, length: int, subset: str = "") -> str:
    """Markdown of the saved evaluations at ``length``: accuracy and bytes per setting, memwise beside
    kvpress (the same prompts), each against its own full cache."""
    ours = json.loads((out / f"memwise-{length}{subset}.json").read_text())
    path = out / f"kvpress-{length}{subset}.json"
    theirs = {r["setting"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    full = next(r for r in ours["rows"] if r["setting"] == "full")
    lines = [f"{ours['prompts']} prompts of {ours['tokens']} tokens; accuracy in % (prose / code), bytes of the "
             "cache in bf16 against the bf16 full cache", "",
             "| setting | bytes (MB) | x fewer | memwise | vs full | kvpress, same press |",
             "|---|---|---|---|---|---|"]
    for r in ours["rows"]:
        press = re.sub(r"\+(fp8|int4(g\d+)?)$", "", r["setting"])
        t = theirs.get(press)
        kv = f"{t['accuracy']:.0f} ({_pct(t['prose'])} / {_pct(t['code'])})" if t else "-"
        if t and press != r["setting"]:
            kv += " (not quantized)"
        lines.append(f"| {r['setting']} | {r['bytes_bf16'] / 1e6:.2f} | {r['x_fewer']:.2f}x | {r['accuracy']:.0f} "
                     f"({_pct(r['prose'])} / {_pct(r['code'])}) | {r['accuracy'] - full['accuracy']:+.0f} | {kv} |")
    return "\n".join(lines)


def load_model(folder: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def main() -> None:
    from memwise.testing import real_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts", help="build and save the prompts")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--keys", type=int, default=10, help="keys per filler and depth (10: 100 prompts)")
    e = sub.add_parser("eval", help="accuracy and bytes of each setting")
    e.add_argument("--length", type=int, default=1024)
    e.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    e.add_argument("--limit", type=int, default=None, help="first N prompts only")
    e.add_argument("--quick", action="store_true", help="10 prompts (one per filler and depth)")
    e.add_argument("--every", type=int, default=1, help="every N-th prompt (3: 34 prompts over both fillers and "
                   "all depths)")
    e.add_argument("--new", type=int, default=16, help="most tokens decoded per answer")
    e.add_argument("--tag", default="", help="appended to the result file's name (runs of other settings)")
    t = sub.add_parser("timing", help="decode tokens/s of each setting against the full cache, interleaved")
    t.add_argument("--length", type=int, default=1024)
    t.add_argument("--settings", nargs="+", default=["full", "fp8", "think0.5", "snapkv0.3", "think0.5+snapkv0.3+fp8"])
    t.add_argument("--steps", type=int, default=16, help="tokens decoded per round")
    t.add_argument("--reps", type=int, default=5, help="timed rounds (after one warm-up round)")
    c = sub.add_parser("compare", help="kept tokens and channels per layer beside kvpress's (after its dump)")
    c.add_argument("--length", type=int, default=1024)
    c.add_argument("--index", type=int, default=0, help="the prompt kvprune_kvpress.py dump --index used")
    m = sub.add_parser("table", help="markdown of the saved memwise and kvpress evaluations")
    m.add_argument("--length", type=int, default=1024)
    m.add_argument("--every", type=int, default=1, help="the subset eval --every N wrote")
    for q in (p, e, t, c, m):
        q.add_argument("--model", type=Path, default=None)
        q.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    folder = args.model or real_model_path()
    if folder is None:
        raise SystemExit("SmolLM2-135M-Instruct not found: run `make model` first (or pass --model)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cmd == "prompts":
        for length in args.lengths:
            data = make_prompts(folder, length, args.keys)
            torch.save(data, args.out / f"prompts-{length}.pt")
            sizes = [len(r["ids"]) for r in data["rows"]]
            print(f"{length}: {len(sizes)} prompts, {min(sizes)}-{max(sizes)} tokens")
        return
    if args.cmd == "table":
        print(table(args.out, args.length, suffix(False, args.every)))
        return
    data = torch.load(args.out / f"prompts-{args.length}.pt", weights_only=True)
    if args.cmd == "compare":
        theirs = torch.load(args.out / f"kvpress-kept-{args.length}.pt", weights_only=True)
        result = compare(load_model(folder), data["rows"][args.index]["ids"], theirs)
        for r in result["layers"]:
            print(json.dumps(r))
        for name, r in result["decode"].items():
            print(json.dumps({"setting": name, "logits": r["logits"], "attention_rel_l2_max": max(r["attention_rel_l2"]),
                              "memwise_vs_its_full": r["memwise_vs_its_full_rel_l2"],
                              "kvpress_vs_its_full": r["kvpress_vs_its_full_rel_l2"]}))
        (args.out / f"compare-{args.length}.json").write_text(json.dumps({"index": args.index, **result}, indent=1))
        return
    if args.cmd == "timing":
        if args.settings[0] != "full":
            raise SystemExit("timing: the first setting is the reference and must be 'full'")
        rows = timing(load_model(folder), data["rows"][0]["ids"], args.settings, args.steps, args.reps)
        meta = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "length": args.length,
                "steps": args.steps, "reps": args.reps, "torch": torch.__version__}
        for r in rows:
            print(json.dumps(r))
        (args.out / f"timing-{args.length}.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
        return
    if args.quick:  # one key per filler and depth
        data["rows"] = data["rows"][::len(data["rows"]) // (2 * len(DEPTHS))]
    data["rows"] = data["rows"][::args.every]
    model = load_model(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    start = time.time()
    result = evaluate(model, tok, data, args.settings, args.new, args.limit, log=lambda s: print(s, flush=True))
    result["meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "seconds": round(time.time() - start, 1),
                      "torch": torch.__version__, "quick": args.quick, "every": args.every}
    for r in result["rows"]:
        print(json.dumps({k: v for k, v in r.items() if k not in ("examples", "hits")}))
    name = f"memwise-{args.length}{suffix(args.quick, args.every, args.limit)}{args.tag}.json"
    (args.out / name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
