"""Optimizer-state techniques side by side on `tiny`: AdamW, COAT, GaLore, Natural GaLore, FRUGAL, each
with and without fused_step.

    python tools/bench/optimizer_states.py quality [--steps 100]   # validation loss after the same steps
    python tools/bench/optimizer_states.py table [--reps 5]        # memory (MemTracker) and step-time ratio

Every run uses the same seed, data and steps, and no gradient clipping (fused_step refuses clipping
by global norm; with clipping off the fused runs' losses equal the unfused ones bitwise, so quality
is run once per optimizer). Memory: one probe step per configuration (exact on CPU). Time: one
training step (forward, backward, optimizer) per configuration, interleaved in one process, median
of the repetitions after a warm-up, as a ratio to AdamW.
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
OPTIMIZERS = {
    "AdamW": [],
    "COAT": ["{use: coat, with: {optimizer: true, activations: false}}"],
    "GaLore r48": ["{use: galore, with: {rank: 48, update_proj_gap: 200, scale: 0.25}}"],
    "Natural GaLore r32 s4": ["{use: galore, with: {rank: 32, update_proj_gap: 200, scale: 0.25, natural: true, "
                              "history: 4}}"],
    "FRUGAL rho 0.25": ["{use: frugal, with: {density: 0.25, update_gap: 200, selection: columns}}"],
}
COMMON = ["trainer.gradient_clip_val=null"]
MIB = 2**20


def _plugins(items: list[str]) -> str:
    return f"plugins=[{', '.join(items)}]"


def quality(steps: int) -> None:
    """One run per optimizer, all at once (separate processes, one thread each)."""
    procs, results = {}, {}
    for label, items in OPTIMIZERS.items():
        out = ROOT / "runs" / ("bench-optstates-" + "-".join(label.lower().split()))
        cmd = [sys.executable, "-m", "memwise.cli", "run", str(ROOT / "recipes" / "base" / "tiny.yaml"),
               _plugins(items), *COMMON, f"trainer.max_steps={steps}", f"report.dir={out}", "trainer.num_threads=1",
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


def table(reps: int) -> None:
    reports, steps = {}, {}
    for label, items in OPTIMIZERS.items():
        for fused in (False, True):
            name = label + (" + fused_step" if fused else "")
            plugins = items + (["{use: fused_step}"] if fused else [])
            reports[name], steps[name] = probe_and_step("tiny", [_plugins(plugins), *COMMON])
            print(name, json.dumps(reports[name].as_dict()), flush=True)
    medians = interleaved(steps, repeats=reps)
    base = reports["AdamW"]
    print(f"\n{machine()}, {reps} interleaved repetitions\n")
    print("| optimizer | optimizer state (MiB) | ratio to AdamW | gradients at peak (MiB) | gradients' own max "
          "(MiB) | peak total (MiB) | step time ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, rep in reports.items():
        state = rep.after_step["optimizer_state"]
        print(f"| {name} | {state / MIB:.2f} | {state / base.after_step['optimizer_state']:.3f}x | "
              f"{rep.at_peak['gradients'] / MIB:.2f} | {rep.category_max['gradients'] / MIB:.2f} | "
              f"{rep.peak_total / MIB:.1f} | {medians[name] / medians['AdamW']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=100)
    t = sub.add_parser("table")
    t.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.what == "quality":
        quality(args.steps)
    else:
        table(args.reps)


if __name__ == "__main__":
    main()
