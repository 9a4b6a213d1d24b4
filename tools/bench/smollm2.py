"""SmolLM2-135M-Instruct SFT figures: memory per category (predicted vs measured) and quality.

memory: for each variant, build the recipe (seq 512 by default), take one warm step and one
measured probe step (MemTracker, exact on CPU), and print predicted beside measured.
quality: the validation losses of the SFT runs under --runs (from their last checkpoints), each
variant against the baseline (same seed, steps and data).

    python tools/bench/smollm2.py memory --variants baseline checkpointing mesa coat coat-mesa
    python tools/bench/smollm2.py quality --runs runs/fig
    python tools/bench/smollm2.py time --variants baseline checkpointing mesa coat coat-mesa

time: the baseline and one variant at a time in one process (two models in memory), one fixed
batch, forward + backward + optimizer step, interleaved after a warm-up, median of the process's
CPU time (run it with OMP_NUM_THREADS=1); the ratio is to the baseline's median measured beside the
same variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MIB, interleaved, machine, probe_and_step, val_history  # noqa: E402

from memwise.memory import CATEGORIES  # noqa: E402

RECIPE = "recipes/finetune/smollm2-sft{}.yaml"


def recipe_of(variant: str) -> str:
    return RECIPE.format("" if variant == "baseline" else f"-{variant}")


def memory(variants: list[str], overrides: list[str]) -> dict:
    from memwise.runner import measure_recipe

    out = {}
    for v in variants:
        rows, report = measure_recipe(recipe_of(v), overrides)
        out[v] = {"predicted": rows[-1][1].as_dict(), "measured": report.headline(),
                  "peak_total": report.peak_total, "peak_rss": report.peak_rss}
        print(f"## {v}: peak {report.peak_total / MIB:,.1f} MiB (rss {report.peak_rss / MIB:,.1f})", flush=True)
        for cat in CATEGORIES:
            print(f"| {cat} | {out[v]['predicted'][cat] / MIB:,.2f} | {out[v]['measured'][cat] / MIB:,.2f} |",
                  flush=True)
        del rows, report
        gc.collect()
    return out


def step_times(variants: list[str], overrides: list[str], repeats: int) -> dict:
    """Step-time ratio of each variant to the baseline, each pair interleaved in this process, in this
    process's CPU time (with one thread, the step's time less what other jobs took of the core)."""
    _, base = probe_and_step(recipe_of("baseline"), overrides)
    out = {}
    for v in variants:
        if v == "baseline":
            continue
        report, step = probe_and_step(recipe_of(v), overrides)
        med = interleaved({"baseline": base, v: step}, repeats=repeats, clock=time.process_time)
        out[v] = {"baseline_s": med["baseline"], "variant_s": med[v], "ratio": med[v] / med["baseline"],
                  "peak_total": report.peak_total}
        print(f"| {v} | {med['baseline']:.2f} | {med[v]:.2f} | {med[v] / med['baseline']:.2f}x |", flush=True)
        del report, step
        gc.collect()
    return out


def quality(folder: Path) -> None:
    """Validation losses from each run's last checkpoint (written before the run's memory probe)."""
    rows = {}
    for ckpt in sorted(folder.glob("*/checkpoints/last.ckpt")):
        h = val_history(ckpt.parents[1])
        rows[ckpt.parents[1].name] = (h["first"], h["last"], h["steps"], h["elapsed_s"])
    base = rows["baseline"][1]
    print("| variant | val loss step 0 | final val loss | steps | vs baseline | wall s (shared machine) |")
    print("|---|---|---|---|---|---|")
    for name, (first, last, steps, elapsed) in rows.items():
        print(f"| {name} | {first:.4f} | {last:.4f} | {steps} | {100 * (last / base - 1):+.2f}% | {elapsed:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("memory")
    p.add_argument("--variants", nargs="+", default=["baseline", "checkpointing", "mesa", "coat", "coat-mesa"])
    p.add_argument("--overrides", nargs="*", default=["data.batch_size=1", "data.max_documents=60",
                                                       "trainer.num_threads=1"])
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    p = sub.add_parser("quality")
    p.add_argument("--runs", type=Path, default=Path("runs/fig"))
    p = sub.add_parser("time")
    p.add_argument("--variants", nargs="+", default=["baseline", "checkpointing", "mesa", "coat", "coat-mesa"])
    p.add_argument("--overrides", nargs="*", default=["data.batch_size=1", "data.max_documents=60"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if args.command == "memory":
        result = memory(args.variants, args.overrides)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    elif args.command == "time":
        print("| variant | baseline step (s) | variant step (s) | ratio |\n|---|---|---|---|", flush=True)
        result = step_times(args.variants, args.overrides, args.repeats)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    else:
        quality(args.runs)


if __name__ == "__main__":
    main()
