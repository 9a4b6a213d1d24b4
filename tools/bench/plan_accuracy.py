"""`memwise plan`'s predicted peak beside MemTracker's measured peak, one row per combination.

    python tools/bench/plan_accuracy.py [--real] [--generate]

Rows print as they finish (markdown). The same combinations as tests/test_planner.py; with
``--generate`` the generation plan's (``memwise plan --stage generate``) against MemTracker's peak
of ``generate``, as tests/test_plan_generate.py.
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


GENERATE_ROWS = [  # kvprune settings (None: the dense cache), batch, prompt, new tokens
    ("dense", None, 1, 256, 32),
    ("ThinK 0.5", {}, 1, 256, 32),
    ("FP8", {"think_ratio": 0.0, "quant": "e4m3"}, 1, 256, 32),
    ("int4", {"think_ratio": 0.0, "quant": "int4"}, 1, 256, 32),
    ("SnapKV 0.5", {"think_ratio": 0.0, "eviction": "snapkv", "budget": 0.5}, 1, 256, 32),
    ("StreamingLLM 0.5", {"think_ratio": 0.0, "eviction": "streaming", "budget": 0.5}, 1, 256, 32),
    ("ThinK + FP8", {"quant": "e4m3"}, 1, 256, 32),
    ("ThinK + SnapKV 0.7 + FP8", {"eviction": "snapkv", "budget": 0.7, "quant": "e4m3"}, 1, 256, 32),
    ("dense, batch 2", None, 2, 128, 16),
    ("dense, 32 + 200 new", None, 1, 32, 200),
]


def generate_row(label: str, model: object, settings: dict | None, batch: int, prompt: int, new: int) -> str:
    from memwise import generation_plan
    from memwise.context import Workload
    from memwise_kvprune import KVPrunePlugin

    plugins = [] if settings is None else [KVPrunePlugin(**settings)]
    workload = Workload(batch, prompt, "32-true", max_new_tokens=new)
    cand = generation_plan.estimate_generation(model, plugins, workload)
    measured = generation_plan.measure_peak(model, plugins, workload)
    err = (cand.peak - measured) / measured
    return (f"| {label}, {batch} x {prompt} + {new} | {cand.peak / 2**20:,.3f} | {measured / 2**20:,.3f} "
            f"| {err:+.1%} |")


def generate_rows(real: bool, only: str | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from memwise.testing import tiny_llama

    models = [("tiny", tiny_llama().eval())]
    folder = real_model_path()
    if real and folder is not None:
        models.append(("SmolLM2-135M", AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()))
    print("| model, cache, batch x prompt + new | predicted peak (MiB) | measured peak (MiB) | error |\n"
          "|---|---:|---:|---:|", flush=True)
    for name, model in models:
        for label, settings, batch, prompt, new in GENERATE_ROWS:
            if (name != "tiny" and batch > 1) or (only is not None and only not in f"{name} {label}"):
                continue
            print(generate_row(f"{name} {label}", model, settings, batch, prompt, new), flush=True)


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
    parser.add_argument("--generate", action="store_true", help="the generation plan's rows instead (fp32)")
    args = parser.parse_args()
    if args.generate:
        generate_rows(args.real, args.only)
        sys.exit(0)
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
