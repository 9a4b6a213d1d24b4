"""Baseline vs activation checkpointing on `tiny` and `small`: memory per category, step time.

    python tools/bench/checkpointing.py [--time]

Memory is measured exactly with MemTracker on a probe step (DESIGN.md section 7).
Step times are medians of interleaved runs, as ratios to the baseline of the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import interleaved, machine, memory_table, probe_and_step  # noqa: E402


CKPT = "plugins=[{use: checkpointing, with: {layers: all}}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--time", action="store_true", help="also time steps (slow)")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    for workload in ("tiny", "small"):
        base_report, base_step = probe_and_step(workload, [])
        ckpt_report, ckpt_step = probe_and_step(workload, [CKPT])
        rows = [("baseline", base_report.headline()), ("checkpointing", ckpt_report.headline())]
        print(f"### {workload}: measured memory (MiB; ratio to baseline)\n")
        print(memory_table(rows, "baseline"))
        peak = base_report.peak_total / ckpt_report.peak_total
        print(f"\nend-to-end peak: {base_report.peak_total / 2**20:,.1f} -> {ckpt_report.peak_total / 2**20:,.1f} MiB "
              f"({peak:.2f}x)\n")
        if args.time:
            t = interleaved({"baseline": base_step, "checkpointing": ckpt_step})
            print(f"step time: checkpointing / baseline = {t['checkpointing'] / t['baseline']:.2f} "
                  f"(median of 5 interleaved, baseline {t['baseline']:.2f} s)\n")


if __name__ == "__main__":
    main()
