"""No technique vs Mesa vs activation checkpointing on `tiny` and `small`, fp32 and bf16.

    python tools/bench/mesa.py [--workloads tiny small] [--precisions fp32 bf16] [--time] [--quality STEPS]

Memory is measured exactly with MemTracker on a probe step (DESIGN.md section 7):
activations saved by forward, each category's own maximum (``category_max``, which also
holds forward's transient tensors) and the end-to-end peak. ``--time``: step-time ratios
to the baseline of the same run (interleaved, median of 5 after warm-up). ``--quality``:
validation loss of baseline and Mesa after STEPS training steps on `tiny` (same seed).
`save_on_cpu` is left out on CPU, where it does nothing; GPU figures: not measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import interleaved, machine, memory_table, probe_and_step  # noqa: E402


VARIANTS = {
    "baseline": [],
    "mesa": ["plugins=[{use: mesa}]"],
    "checkpointing": ["plugins=[{use: checkpointing, with: {layers: all}}]"],
}
PRECISIONS = {"fp32": "trainer.precision=32-true", "bf16": "trainer.precision=bf16-mixed"}
MIB = 2**20


def memory(workloads: list[str], precisions: list[str], time_steps: bool) -> None:
    for workload in workloads:
        for pname in precisions:
            precision = PRECISIONS[pname]
            reports, steps = {}, {}
            for name, extra in VARIANTS.items():
                reports[name], steps[name] = probe_and_step(workload, [precision, *extra])
            print(f"### {workload}, {pname}: measured memory (MiB; ratio to baseline)\n")
            print(memory_table([(n, r.headline()) for n, r in reports.items()], "baseline"))
            base = reports["baseline"]
            print("\n| variant | saved activations | activation peak (own max) | end-to-end peak |")
            print("|---|---|---|---|")
            for name, r in reports.items():
                saved, own = r.after_forward["activations"], r.category_max["activations"]
                print(f"| {name} | {saved / MIB:,.1f} MiB ({base.after_forward['activations'] / saved:.2f}x) | "
                      f"{own / MIB:,.1f} MiB ({base.category_max['activations'] / own:.2f}x) | "
                      f"{r.peak_total / MIB:,.1f} MiB ({base.peak_total / r.peak_total:.2f}x) |")
            print()
            if time_steps:
                t = interleaved(steps)
                ratios = ", ".join(f"{n} {t[n] / t['baseline']:.2f}" for n in steps if n != "baseline")
                print(f"step time / baseline: {ratios} (median of 5 interleaved, baseline {t['baseline']:.2f} s)\n")


def quality(steps: int) -> None:
    from memwise.cli import main

    out = {}
    for name, extra in (("baseline", []), ("mesa", VARIANTS["mesa"])):
        folder = Path("runs") / f"bench-mesa-{name}"
        args = [f"trainer.max_steps={steps}", f"report.dir={folder}", "report.plots=false",
                "trainer.progress_bar=false", *extra]
        assert main(["run", "recipes/baseline.yaml", *args]) == 0
        import json

        out[name] = json.loads((folder / "summary.json").read_text())["final_val_loss"]
    diff = (out["mesa"] - out["baseline"]) / out["baseline"]
    print(f"### tiny quality: validation loss after {steps} steps: baseline {out['baseline']:.4f}, "
          f"mesa {out['mesa']:.4f} ({diff:+.2%})\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", nargs="+", default=["tiny", "small"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--time", action="store_true", help="also time steps (slow)")
    parser.add_argument("--quality", type=int, default=0, metavar="STEPS", help="train tiny this many steps")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    memory(args.workloads, args.precisions, args.time)
    if args.quality:
        quality(args.quality)


if __name__ == "__main__":
    main()
