"""Optimizer-state techniques side by side on `tiny` (or a recipe): AdamW, bitsandbytes AdamW8bit, COAT,
GaLore, Natural GaLore, FRUGAL, each with and without fused_step.

    python tools/bench/optimizer_states.py quality [--steps 100]   # validation loss after the same steps
    python tools/bench/optimizer_states.py table [--reps 5]        # memory (MemTracker) and step-time ratio
    python tools/bench/optimizer_states.py table --workload recipes/finetune/smollm2-sft.yaml \
        --overrides data.batch_size=1 --rank 128 --natural-rank 128 --reps 3   # the real model

Every run uses the same seed, data and steps, and no gradient clipping (fused_step refuses clipping
by global norm; with clipping off the fused runs' losses equal the unfused ones bitwise, so quality
is run once per optimizer). Memory: one probe step per configuration (exact on CPU). Time: one
training step (forward, backward, optimizer) per configuration, interleaved in one process, median
of the repetitions after a warm-up, as a ratio to AdamW measured beside it (two models alive at a
time, so a real model fits), in process CPU time (run it with OMP_NUM_THREADS=1: the ratio then
leaves out the time other jobs held the cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, probe_and_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


BNB = "bitsandbytes AdamW8bit"
"""Not a plugin: the recipe's ``optimizer.name: adamw8bit``."""


def optimizers(rank: int = 48, natural_rank: int = 32) -> dict[str, list[str]]:
    """The plugin lists compared, GaLore and FRUGAL at about a quarter of AdamW's state on `tiny`."""
    return {
        "AdamW": [],
        BNB: [],
        "COAT": ["{use: coat, with: {optimizer: true, activations: false}}"],
        f"GaLore r{rank}": [f"{{use: galore, with: {{rank: {rank}, update_proj_gap: 200, scale: 0.25}}}}"],
        f"Natural GaLore r{natural_rank} s4": [f"{{use: galore, with: {{rank: {natural_rank}, update_proj_gap: 200, "
                                               "scale: 0.25, natural: true, history: 4}}"],
        "FRUGAL rho 0.25": ["{use: frugal, with: {density: 0.25, update_gap: 200, selection: columns}}"],
    }


COMMON = ["trainer.gradient_clip_val=null"]
MIB = 2**20


def _overrides(label: str, items: list[str]) -> list[str]:
    return [f"plugins=[{', '.join(items)}]", *(["optimizer.name=adamw8bit"] if label == BNB else [])]


def quality(steps: int, only: list[str]) -> None:
    """One run per optimizer, all at once (separate processes, one thread each)."""
    procs, results = {}, {}
    for label, items in optimizers().items():
        if only and label not in only:
            continue
        out = ROOT / "runs" / ("bench-optstates-" + "-".join(label.lower().split()))
        cmd = [sys.executable, "-m", "memwise.cli", "run", str(ROOT / "recipes" / "base" / "tiny.yaml"),
               *_overrides(label, items), *COMMON, f"trainer.max_steps={steps}", f"report.dir={out}", "trainer.num_threads=1",
               f"trainer.val_every_n_steps={steps}", "trainer.progress_bar=false", "report.plots=false",
               "report.probe_memory=false"]
        procs[label] = (subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
    for label, (proc, out) in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{label}: run failed (exit {proc.returncode}); rerun it alone to see why")
        results[label] = json.loads((out / "summary.json").read_text())["final_val_loss"]
        print(f"{label}: validation loss {results[label]:.4f} after {steps} steps", flush=True)
    base = results["AdamW"]
    print(f"\n| optimizer | validation loss after {steps} steps | relative to AdamW |\n|---|---|---|")
    for label, loss in results.items():
        print(f"| {label} | {loss:.4f} | {loss / base - 1:+.2%} |")


def table(reps: int, workload: str, overrides: list[str], rank: int, natural_rank: int) -> None:
    import gc
    import time

    reports, medians = {}, {}
    base_report, base_step = probe_and_step(workload, [*_overrides("AdamW", []), *COMMON, *overrides])
    for label, items in optimizers(rank, natural_rank).items():
        for fused in (False, True):
            name = label + (" + fused_step" if fused else "")
            plugins = items + (["{use: fused_step}"] if fused else [])
            if name == "AdamW":
                reports[name], medians[name] = base_report, 1.0
                continue
            reports[name], step = probe_and_step(workload, [*_overrides(label, plugins), *COMMON, *overrides])
            t = interleaved({"AdamW": base_step, name: step}, repeats=reps, clock=time.process_time)
            medians[name] = t[name] / t["AdamW"]
            print(name, f"{medians[name]:.3f}", json.dumps(reports[name].as_dict()), flush=True)
            del step
            gc.collect()
    base = reports["AdamW"]
    print(f"\n{machine()}, {workload} {' '.join(overrides)}, {reps} interleaved repetitions beside AdamW, "
          "process CPU time\n")
    print("| optimizer | optimizer state (MiB) | ratio to AdamW | gradients at peak (MiB) | gradients' own max "
          "(MiB) | peak total (MiB) | step time ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, rep in reports.items():
        state = rep.after_step["optimizer_state"]
        print(f"| {name} | {state / MIB:.2f} | {state / base.after_step['optimizer_state']:.3f}x | "
              f"{rep.at_peak['gradients'] / MIB:.2f} | {rep.category_max['gradients'] / MIB:.2f} | "
              f"{rep.peak_total / MIB:.1f} | {medians[name]:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=100)
    q.add_argument("--only", default="", help="comma-separated labels (AdamW is the reference: keep it)")
    t = sub.add_parser("table")
    t.add_argument("--reps", type=int, default=5)
    t.add_argument("--workload", default="tiny", help="a reference workload or a recipe file")
    t.add_argument("--overrides", nargs="*", default=[])
    t.add_argument("--rank", type=int, default=48, help="GaLore's rank")
    t.add_argument("--natural-rank", type=int, default=32, help="Natural GaLore's rank")
    args = ap.parse_args()
    if args.what == "quality":
        quality(args.steps, [x for x in args.only.split(",") if x])
    else:
        table(args.reps, args.workload, args.overrides, args.rank, args.natural_rank)


if __name__ == "__main__":
    main()
