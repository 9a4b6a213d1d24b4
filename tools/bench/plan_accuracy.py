"""`memwise plan`'s predicted peak beside MemTracker's measured peak, one row per combination.

    python tools/bench/plan_accuracy.py [--real]

Rows print as they finish (markdown). The same combinations as tests/test_planner.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from memwise import planner
from memwise import recipe as recipes
from memwise.runner import Run
from memwise.testing import real_model_path

ROOT = Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "tests" / "recipes" / "micro.yaml")
TINY = str(ROOT / "recipes" / "baseline.yaml")
SMALL = str(ROOT / "recipes" / "base" / "small.yaml")
ROWS = [
    ("micro fp32", MICRO, []),
    ("micro bf16-mixed", MICRO, ["trainer.precision=bf16-mixed"]),
    ("micro checkpointing", MICRO, ["plugins=[{use: checkpointing}]"]),
    ("micro coat optimizer", MICRO, ["plugins=[{use: coat, with: {activations: false}}]"]),
    ("micro checkpointing + coat optimizer", MICRO,
     ["plugins=[{use: checkpointing}, {use: coat, with: {activations: false}}]"]),
    ("micro coat (FP8 activations too)", MICRO, ["plugins=[{use: coat}]"]),
    ("micro mesa", MICRO, ["plugins=[{use: mesa}]"]),
    ("micro coat, bf16-mixed", MICRO, ["trainer.precision=bf16-mixed", "plugins=[{use: coat}]"]),
    ("micro mesa, bf16-mixed", MICRO, ["trainer.precision=bf16-mixed", "plugins=[{use: mesa}]"]),
    ("tiny fp32, batch 4", TINY, ["data.max_documents=40", "data.batch_size=4"]),
    ("tiny checkpointing, batch 4", TINY, ["data.max_documents=40", "data.batch_size=4",
                                           "plugins=[{use: checkpointing}]"]),
    ("tiny coat, batch 4", TINY, ["data.max_documents=40", "data.batch_size=4", "plugins=[{use: coat}]"]),
    ("tiny mesa, batch 4", TINY, ["data.max_documents=40", "data.batch_size=4", "plugins=[{use: mesa}]"]),
    ("small fp32, batch 1", SMALL, ["data.max_documents=40", "data.batch_size=1"]),
    ("small coat, batch 1", SMALL, ["data.max_documents=40", "data.batch_size=1", "plugins=[{use: coat}]"]),
    ("small mesa, batch 1", SMALL, ["data.max_documents=40", "data.batch_size=1", "plugins=[{use: mesa}]"]),
]


def row(label: str, path: str, overrides: list[str]) -> str:
    run = Run(recipes.load(path, overrides), "fit")
    run.build()
    cand = planner.estimate(run.ctx.model, run.recipe.plugins, run.ctx.workload)
    run.transform()
    measured = run.probe_without_training().peak_total
    run.host.teardown(run.ctx)
    err = (cand.peak - measured) / measured
    return f"| {label} | {cand.peak / 2**20:,.2f} | {measured / 2**20:,.2f} | {err:+.1%} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real", action="store_true", help="also SmolLM2-135M at 32 and 256 tokens (make model)")
    parser.add_argument("--only", default=None, help="rows whose label contains this")
    args = parser.parse_args()
    rows = [r for r in ROWS if args.only is None or args.only in r[0]]
    folder = real_model_path()
    if args.real and folder is not None:
        for tokens in (32, 256):
            tmp = Path(tempfile.mkdtemp()) / "real.yaml"
            tmp.write_text(yaml.safe_dump({
                "model": {"builder": "llama", "path": str(folder)},
                "data": {"builder": "text_files", "paths": [f"{ROOT}/core/*.py"], "seq_len": tokens,
                         "batch_size": 1, "max_documents": 20, "val_batches": 1, "val_percent": 10.0}}))
            for plugins in ("", "coat", "mesa"):
                label = f"SmolLM2-135M fp32{', ' + plugins if plugins else ''}, 1 x {tokens} tokens"
                rows.append((label, str(tmp), [f"plugins=[{{use: {plugins}}}]"] if plugins else []))
    print("| combination | predicted peak (MiB) | measured peak (MiB) | error |\n|---|---:|---:|---:|", flush=True)
    for label, path, overrides in rows:
        print(row(label, path, overrides), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
