"""COAT benchmark: memory by category (tiny, small), optimizer bytes per parameter, step-time ratio, quality.

    python tools/bench/coat.py memory  [--workloads tiny small] [--out runs/bench-coat-memory.md]
    python tools/bench/coat.py optimizer [--reps 7] [--threads 1] [--size 2048]
    python tools/bench/coat.py quality [--steps 300]

Memory: one probe step per configuration (MemTracker on CPU: exact and repeatable), baseline
and COAT variants side by side at the same precision. Times: ratios to the baseline measured in
the same process, interleaved, median of the repetitions after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, memory_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "baseline": "plugins=[]",
    "coat optimizer": "plugins=[{use: coat, with: {optimizer: true, activations: false}}]",
    "coat activations": "plugins=[{use: coat, with: {optimizer: false, activations: true}}]",
    "coat both": "plugins=[{use: coat, with: {optimizer: true, activations: true}}]",
}
MIB = 2**20


def memory(workloads: list[str], precision: str, out: Path | None) -> None:
    from memwise.runner import measure_recipe

    lines = [f"## COAT memory, precision {precision} (MemTracker, one probe step; MiB)", ""]
    for wl in workloads:
        recipe = str(ROOT / "recipes" / "base" / f"{wl}.yaml")
        results = {}
        for label, plugins in VARIANTS.items():
            rows, rep = measure_recipe(recipe, [plugins, f"trainer.precision={precision}"])
            results[label] = (rows[-1][1].as_dict(), rep)
            print(wl, label, json.dumps(rep.as_dict()), flush=True)
        base_peak = results["baseline"][1].peak_total
        table_rows = [(label, {**rep.category_max, "optimizer_state": rep.after_step["optimizer_state"]})
                      for label, (_, rep) in results.items()]
        lines += [f"### {wl} ({machine()})", "", "Each category's own maximum over one step (optimizer state: "
                  "after the step), MiB, ratio to the baseline in brackets:", "", memory_table(table_rows, "baseline"),
                  "", "| variant | peak total (MiB) | peak ratio | optimizer state predicted = measured |", "|---|---|---|---|"]
        for label, (pred, rep) in results.items():
            same = pred["optimizer_state"] == rep.after_step["optimizer_state"]
            lines.append(f"| {label} | {rep.peak_total / MIB:.2f} | {base_peak / rep.peak_total:.2f}x | "
                         f"{pred['optimizer_state']:,} ({'exact' if same else 'differs'}) |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=688, vocab_size=260))


def _peers() -> dict:
    """Optimizer factories: torch AdamW, CoatAdamW, and peers when installed (and working here)."""
    from memwise_coat import CoatAdamW

    peers = {"torch AdamW (fp32)": lambda ps, model: torch.optim.AdamW(ps, lr=1e-3),
             "CoatAdamW": lambda ps, model: CoatAdamW(ps, lr=1e-3, fp32_params=_fp32(model) if model else ())}
    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(4096))  # its CPU path must step, not only import
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
        peers["bitsandbytes AdamW8bit"] = lambda ps, model: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except Exception as exc:  # noqa: BLE001 - any failure: not installed or no usable build
        print(f"bitsandbytes AdamW8bit: skipped ({type(exc).__name__}: {str(exc)[:120]}; "
              "pip install 'memwise-coat[bench]' to compare)")
    try:
        from torchao.optim import AdamWFp8

        peers["torchao AdamWFp8"] = lambda ps, model: AdamWFp8(ps, lr=1e-3)
    except Exception as exc:  # noqa: BLE001
        print(f"torchao AdamWFp8: skipped ({type(exc).__name__})")
    return peers


def _fp32(model):
    from memwise_coat.selection import fp32_parameters

    return fp32_parameters(model, ["*embed*", "*norm*"])


def tensor_steps(reps: int, size: int) -> dict[str, float]:
    """Step time of each optimizer on two ``size`` x ``size`` fp32 tensors (all of them FP8 in COAT),
    interleaved in this process: median seconds."""
    steps = {}
    for label, make in _peers().items():
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(size, size, generator=gen) * 0.02) for _ in range(2)]
        for p in params:
            p.grad = torch.randn(size, size, generator=gen) * 1e-3
        steps[label] = make(params, None).step
    import time

    wall = interleaved(steps, repeats=reps, warmup=2)
    cpu = interleaved(steps, repeats=reps, warmup=0, clock=time.thread_time)
    label = "torch AdamW (fp32)"
    print(f"\n| optimizer (2 x {size}x{size} fp32, {torch.get_num_threads()} thread(s)) | step, wall (ms) | "
          "ratio to torch AdamW, wall | step, CPU time (ms) | ratio, CPU time |")
    print("|---|---|---|---|---|")
    for name in wall:
        print(f"| {name} | {wall[name] * 1e3:.1f} | {wall[name] / wall[label]:.2f}x | {cpu[name] * 1e3:.1f} | "
              f"{cpu[name] / cpu[label]:.2f}x |")
    print(f"({machine()}; load average {_load()}; medians of {reps} interleaved rounds after 2 warm-up rounds, "
          "wall clock, then as many rounds timed by this thread's CPU time)")
    return cpu


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "unknown"


def optimizer(reps: int, size: int) -> None:
    from memwise.memory import measure_step

    ids = torch.randint(0, 260, (2, 64), generator=torch.Generator().manual_seed(0))
    models, opts = {}, {}
    print("| optimizer | state bytes | bytes/param (whole model) | bytes/param (FP8 tensors) |")
    print("|---|---|---|---|")
    for label, make in _peers().items():
        model = _tiny_model()
        opt = make(list(model.parameters()), model)
        rep = measure_step(model, opt, lambda m=model: m(input_ids=ids, labels=ids).loss)
        total = sum(p.numel() for p in model.parameters())
        state = rep.after_step["optimizer_state"]
        per_q = ""
        if label == "CoatAdamW":
            q = [p for g in opt.param_groups for p in g["params"] if opt.quantizes(p, g)]
            qbytes = sum(sum(t.untyped_storage().nbytes() for t in opt.state[p].values()) for p in q)
            per_q = f"{qbytes / sum(p.numel() for p in q):.4f}"
        print(f"| {label} | {state:,} | {state / total:.4f} | {per_q} |")
        models[label], opts[label] = model, opt
    # step time: interleaved, median after warm-up, ratio to torch AdamW (same process, same machine)
    for model in models.values():
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    import time

    steps = {label: opt.step for label, opt in opts.items()}
    medians = interleaved(steps, repeats=reps)
    cpu = interleaved(steps, repeats=reps, warmup=0, clock=time.thread_time)
    ref, cpu_ref = medians["torch AdamW (fp32)"], cpu["torch AdamW (fp32)"]
    for label, t in medians.items():
        print(f"step time {label}: median {t * 1e3:.1f} ms wall, ratio to torch AdamW {t / ref:.2f}x; "
              f"{cpu[label] * 1e3:.1f} ms CPU time, ratio {cpu[label] / cpu_ref:.2f}x "
              f"({machine()}, {reps} interleaved reps)")
    tensor_steps(reps, size)


def quality(steps: int) -> None:
    """Train tiny with AdamW and with COAT (same seed, same data); print final train/val losses."""
    results = {}
    for label, plugins in (("baseline", VARIANTS["baseline"]), ("coat both", VARIANTS["coat both"])):
        out = ROOT / "runs" / f"bench-coat-quality-{label.replace(' ', '-')}"
        cmd = [sys.executable, "-m", "memwise.cli", "run", str(ROOT / "recipes" / "coat.yaml"), plugins,
               f"trainer.max_steps={steps}", f"report.dir={out}", "trainer.progress_bar=false", "report.plots=false"]
        subprocess.run(cmd, check=True, cwd=ROOT)
        results[label] = json.loads((out / "summary.json").read_text())
    for label, s in results.items():
        print(label, {k: s.get(k) for k in ("final_train_loss", "final_val_loss", "steps")})
    b, c = results["baseline"]["final_val_loss"], results["coat both"]["final_val_loss"]
    print(f"validation loss: AdamW {b:.4f}, COAT {c:.4f}, relative {c / b - 1:+.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--workloads", nargs="+", default=["tiny", "small"])
    m.add_argument("--precision", default="32-true")
    m.add_argument("--out", type=Path)
    o = sub.add_parser("optimizer")
    o.add_argument("--reps", type=int, default=7)
    o.add_argument("--threads", type=int, default=1, help="torch CPU threads (step times are per thread count)")
    o.add_argument("--size", type=int, default=2048, help="side of the two square tensors of the step-time table")
    o.add_argument("--tensors-only", action="store_true", help="only the step-time table on the two tensors")
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    if args.what == "memory":
        memory(args.workloads, args.precision, args.out)
    elif args.what == "optimizer":
        torch.set_num_threads(args.threads)
        if args.tensors_only:
            tensor_steps(args.reps, args.size)
        else:
            optimizer(args.reps, args.size)
    else:
        quality(args.steps)


if __name__ == "__main__":
    main()
