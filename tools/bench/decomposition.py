"""Benchmark dataset decomposition against concat-and-chunk on the `long` workload.

Three parts, each printed as a table and saved under --out (JSON):

  stats   what the document lengths allow: buckets, tokens kept/dropped, mean attended
          context and attention FLOPs per token, for unit file/definition and both
          long-document rules, at each --max-len (no training; seconds).
  speed   training-step throughput of the tiny model: each bucket's step and the
          concat_chunk step, interleaved (A B A B ...), median of --reps after warm-up;
          decomposition's tokens/s weights each bucket by its share of steps.
  train   `memwise run` of recipes/decomposition.yaml and of the same recipe with the
          plugin removed and data.packing=concat_chunk (equal token budget, same model, seed
          and held-out windows: fixed windows inside each validation document, no cross-
          document context); validation loss against tokens and wall time, and the
          speed-up to reach the baseline's final validation loss.

  python tools/bench/decomposition.py stats speed train --steps 150 --units definition file \\
      --set model.config.hidden_size=128 ...
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=688, max_position_embeddings=4096)


def load_corpus(unit: str, max_documents: int | None = None):
    from memwise.data.corpus import from_documents
    from memwise.data.documents import pystdlib_documents
    from memwise.data.tokens import ByteTokenizer

    return from_documents(pystdlib_documents(unit), ByteTokenizer(), val_percent=5.0, seed=0,
                          max_documents=max_documents)


# --- stats --------------------------------------------------------------------------------

def stats(units: list[str], max_lens: list[int], min_len: int, budget: int) -> list[dict]:
    from memwise_decomposition import BucketDataset, bucket_report, decompose, sampler_for

    out = []
    for unit in units:
        corpus = load_corpus(unit)
        for max_len in max_lens:
            for rule in ("longest", "paper"):
                b = decompose(corpus.train, min_len, max_len, rule=rule, seed=0)
                sampler = sampler_for(BucketDataset(b), max(budget, max_len), curriculum="natural")
                rep = bucket_report(b, sampler, baseline_seq_len=max_len, hidden_size=TINY["hidden_size"],
                                    num_layers=TINY["num_hidden_layers"])
                rep.update(unit=unit, rule=rule)
                out.append(rep)
    print(f"{'unit':10} {'max':>5} {'rule':8} {'kept':>6} {'dropped':>8} {'ctx DD':>7} {'ctx C&C':>7} "
          f"{'saving':>6} {'FLOPs/tok DD':>12} {'C&C':>10} shapes")
    for r in out:
        print(f"{r['unit']:10} {r['max_len']:5} {r['rule']:8} {r['kept_fraction']:6.1%} {r['targets_dropped']:8} "
              f"{r['mean_context']:7.1f} {r['baseline']['mean_context']:7.1f} {r['attention_saving']:6.2f} "
              f"{r['attention_flops_per_token']:12.3g} {r['baseline']['attention_flops_per_token']:10.3g} "
              f"{r['distinct_shapes']}")
    return out


# --- speed --------------------------------------------------------------------------------

def speed(units: list[str], max_len: int, min_len: int, budget: int, reps: int, threads: int) -> dict:
    """Median step time per shape (measured once, interleaved), then tokens/s per unit's bucket mix."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from memwise_decomposition import BucketDataset, decompose, sampler_for

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=260, attn_implementation="sdpa", **TINY))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    logs = list(range(min_len.bit_length() - 1, max_len.bit_length()))
    shapes = {"concat_chunk": (budget // max_len, max_len)}
    shapes.update({f"DD {1 << k}": (budget >> k, (1 << k) + 1) for k in logs})

    def step(shape: tuple[int, int]) -> float:
        ids = torch.randint(0, 256, shape)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for shape in shapes.values():  # warm-up
        step(shape)
    times: dict[str, list[float]] = {name: [] for name in shapes}
    for _ in range(reps):
        for name in [n for n in shapes if n != "concat_chunk"]:
            times["concat_chunk"].append(step(shapes["concat_chunk"]))
            times[name].append(step(shapes[name]))
    med = {name: statistics.median(v) for name, v in times.items()}
    base_tps = shapes["concat_chunk"][0] * (max_len - 1) / med["concat_chunk"]
    res = {"max_len": max_len, "budget": budget, "threads": threads, "reps": reps, "median_step_s": med,
           "concat_tokens_per_s": base_tps, "units": {}}
    print(f"speed (hidden {TINY['hidden_size']}, {TINY['num_hidden_layers']} layers, max {max_len}, "
          f"{budget} targets/step, {threads} threads, median of {reps}):")
    for name, t in med.items():
        print(f"  {name:14} {t:7.3f} s/step  {budget / t if name != 'concat_chunk' else base_tps:8.0f} tok/s")
    for unit in units:
        for rule in ("paper", "longest"):
            b = decompose(load_corpus(unit).train, min_len, max_len, rule=rule, seed=0)
            sampler = sampler_for(BucketDataset(b), budget, curriculum="natural")
            share = np.asarray(sampler.full_batches, dtype=float) / sum(sampler.full_batches)
            dd_step = float(sum(s * med[f"DD {1 << k}"] for s, k in zip(share, b.logs)))
            r = {"bucket_step_share": share.tolist(), "dd_step_s": dd_step, "dd_tokens_per_s": budget / dd_step,
                 "throughput_ratio": budget / dd_step / base_tps}
            res["units"][f"{unit}/{rule}"] = r
            print(f"  {unit:10} {rule:8} decomposition {r['dd_tokens_per_s']:6.0f} tok/s vs concat_chunk "
                  f"{base_tps:6.0f} tok/s: {r['throughput_ratio']:.2f}x")
    return res


# --- train --------------------------------------------------------------------------------

def memwise_run(recipe: Path, folder: Path, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "MEMWISE_PLUGINS": "decomposition"}
    cmd = [str(Path(sys.executable).parent / "memwise"), "run", str(recipe), *overrides, f"report.dir={folder}"]
    print("  $", " ".join(cmd[1:]), flush=True)
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-4000:] + out.stderr[-4000:])
    with open(folder / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def time_to(curve: list[dict], target: float, key: str) -> float | None:
    """First ``key`` (elapsed_s or tokens) at which the validation loss reaches ``target`` (linear in between)."""
    pts = [(r[key], r["val_loss"]) for r in curve if "val_loss" in r]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y1 <= target:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1) if y0 > target else x0
    return None


def train(unit: str, steps: int, out: Path, extra: list[str]) -> dict:
    recipe = ROOT / "recipes" / "decomposition.yaml"
    common = [f"data.unit={unit}", f"trainer.max_steps={steps}", "trainer.progress_bar=false", "report.plots=false",
              "report.probe_memory=false", "data.val_batches=8", f"trainer.val_every_n_steps={max(steps // 8, 1)}",
              *extra]
    dd = memwise_run(recipe, out / f"dd-{unit}", common)
    base = memwise_run(recipe, out / f"cc-{unit}", [*common, "plugins=[]", "data.packing=concat_chunk"])
    final = [r["val_loss"] for r in base if "val_loss" in r][-1]
    res = {"unit": unit, "steps": steps, "baseline_final_val_loss": final,
           "dd_final_val_loss": [r["val_loss"] for r in dd if "val_loss" in r][-1],
           "baseline_elapsed_s": base[-1]["elapsed_s"], "dd_elapsed_s": dd[-1]["elapsed_s"],
           "baseline_tokens": base[-1]["tokens"], "dd_tokens": dd[-1]["tokens"],
           "dd_time_to_baseline_loss_s": time_to(dd, final, "elapsed_s"),
           "dd_tokens_to_baseline_loss": time_to(dd, final, "tokens"),
           "curves": {"decomposition": [r for r in dd if "val_loss" in r],
                      "concat_chunk": [r for r in base if "val_loss" in r]}}
    t = res["dd_time_to_baseline_loss_s"]
    res["wall_time_speedup"] = res["baseline_elapsed_s"] / t if t else None
    print(f"train ({unit}, {steps} steps): val loss C&C {final:.4f} in {res['baseline_elapsed_s']:.0f} s; "
          f"DD {res['dd_final_val_loss']:.4f} in {res['dd_elapsed_s']:.0f} s; DD reaches C&C's final loss at "
          f"{t if t is None else round(t)} s -> speed-up {res['wall_time_speedup']}")
    for name, curve in res["curves"].items():
        print(f"  {name:14} " + "  ".join(f"{int(r['step'])}:{r['val_loss']:.3f}@{r['elapsed_s']:.0f}s/"
                                         f"{int(r['tokens'])}t" for r in curve))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=["stats", "speed", "train"])
    ap.add_argument("--units", nargs="+", default=["definition", "file"])
    ap.add_argument("--max-len", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--budget", type=int, default=4096, help="targets per step")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hidden-size", type=int, default=TINY["hidden_size"], help="model for stats/speed")
    ap.add_argument("--layers", type=int, default=TINY["num_hidden_layers"])
    ap.add_argument("--intermediate-size", type=int, default=TINY["intermediate_size"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-decomposition")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe override for `train` (repeatable; applied to both runs)")
    args = ap.parse_args()
    TINY.update(hidden_size=args.hidden_size, num_hidden_layers=args.layers, intermediate_size=args.intermediate_size)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": os.uname().machine, "cpu_threads": args.threads, "model": dict(TINY),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "stats" in args.parts:
        results["stats"] = stats(args.units, args.max_len, args.min_len, args.budget)
    if "speed" in args.parts:
        results["speed"] = speed(args.units, args.max_len[0], args.min_len, args.budget, args.reps, args.threads)
    if "train" in args.parts:
        results["train"] = [train(u, args.steps, args.out, [f"trainer.num_threads={args.threads}", *args.overrides])
                            for u in args.units]
    name = "-".join(args.parts) + ".json"
    (args.out / name).write_text(json.dumps(results, indent=1))
    print(f"saved {args.out / name}")


if __name__ == "__main__":
    main()
