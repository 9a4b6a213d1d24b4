"""Activation techniques side by side on `small` and on `small` with a 32k vocabulary: baseline,
checkpointing, Mesa, offload, offload + Mesa, chunked CE and the full composition
(COAT optimizer + Mesa + chunked CE + offload), each category, end-to-end peak, step time.

    python tools/bench/activations.py [--time] [--vocab 32768,260] [--only a,b] [--batch N] [--workload tiny]
    python tools/bench/activations.py --quality tiny --steps 50 --vocab 32768 [--only a,b]
    python tools/bench/activations.py --head        # LM head + loss alone at SmolLM2's shapes
    python tools/bench/activations.py --tiny-time [--vocab 32768,260] [--batch 4]   # step times on tiny

Memory is measured exactly with MemTracker on a probe step (DESIGN.md section 7); host bytes
(offload) come from the host ledger, counted for this variant only. Step times are medians of
interleaved runs (A B A B ...), as ratios to the baseline of the same run. Each variant's figures
are written under --out as soon as they are measured and read back on a later call, so the table
can be built in pieces (--only) and a stopped run resumes.

--quality trains each variant with `memwise run` (same seed, data, batches and steps) and tables
the validation loss and the run's own measured peak: the composition goal (end-to-end peak >= 4x
below bf16-mixed AdamW's within 1% validation loss) on one workload.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import MIB, QUICK_DATA, interleaved, machine, memory_table, probe_and_step, val_history  # noqa: E402

MESA = "{use: mesa, with: {exclude: ['*lm_head']}}"
OFFLOAD = "{use: offload, with: {layers: all, fraction: 1.0, prefetch: 1}}"
CE = "{use: chunked_ce}"
COAT = "{use: coat, with: {activations: false}}"
COMPOSED = f"{COAT}, {MESA}, {CE}, {OFFLOAD}"
COMPOSITION = f"plugins=[{COMPOSED}]"
# no layer fetched ahead: each offloaded storage comes back when backward reads it (the copies do not
# overlap compute on a CPU anyway); the gradients are bitwise those of prefetch 1
UNFETCHED = f"plugins=[{COMPOSED.replace('prefetch: 1', 'prefetch: 0')}]"
# fused_step applies each update in backward, before a global gradient norm exists: no clipping
FUSED = ["trainer.gradient_clip_val=null", f"plugins=[{COMPOSED}, {{use: fused_step}}]"]
VARIANTS = {
    "baseline": [],
    "checkpointing": ["plugins=[{use: checkpointing, with: {layers: all}}]"],
    "mesa": [f"plugins=[{MESA}]"],
    "offload": [f"plugins=[{OFFLOAD}]"],
    "offload+mesa": [f"plugins=[{MESA}, {OFFLOAD}]"],
    "chunked_ce": [f"plugins=[{CE}]"],
    "composition": [COMPOSITION],
    "composition + fused_step": FUSED,
    "baseline bf16-mixed": ["trainer.precision=bf16-mixed"],
    # fused_step's reference for the loss: AdamW without the global-norm clipping it cannot do
    "baseline bf16-mixed no clipping": ["trainer.precision=bf16-mixed", "trainer.gradient_clip_val=null"],
    "composition bf16-mixed": ["trainer.precision=bf16-mixed", COMPOSITION],
    "composition bf16-mixed prefetch 0": ["trainer.precision=bf16-mixed", UNFETCHED],
    "composition + fused_step bf16-mixed": ["trainer.precision=bf16-mixed", *FUSED],
}
COMPOSITIONS = [n for n in VARIANTS if n.startswith("composition")]


def head_share(tokens: int, hidden: int, vocab: int) -> None:
    """The LM head + loss alone under MemTracker: peak bytes above the hidden states, the weight
    and their gradients (which both paths hold), HF's path (linear + cross-entropy) vs chunked."""
    from memwise_chunked_ce import auto_chunk_size
    from memwise_chunked_ce.measure import head_loss_peaks

    base, chunked = head_loss_peaks(tokens, hidden, vocab)
    chunk = auto_chunk_size(tokens, hidden, vocab)
    print(f"head + loss alone, {tokens} tokens, hidden {hidden}, vocabulary {vocab} (chunk {chunk}): "
          f"{base / 2**20:,.1f} MiB -> {chunked / 2**20:,.1f} MiB ({base / chunked:.1f}x)\n")


def tiny_times(vocab: int, batch: int, names: list[str]) -> None:
    """Step-time ratios of the fp32 variants on `tiny` (hidden 256, 4 layers, seq 256) through the
    recipe path, one fixed batch each, interleaved; wall time and process CPU time (which leaves out
    the time other jobs held the cores of a shared machine)."""
    steps = {}
    for name in names:
        if "bf16" in name:
            continue
        _, steps[name] = probe_and_step("tiny", [f"model.config.vocab_size={vocab}", f"data.batch_size={batch}",
                                                 *VARIANTS[name]])
        gc.collect()
    wall = interleaved(steps)
    cpu = interleaved(steps, warmup=0, clock=time.process_time)
    base = "baseline" if "baseline" in steps else next(iter(steps))
    print(f"### step time on `tiny`, vocabulary {vocab}, batch {batch} x 256 (median of 5 interleaved; "
          f"{base} {wall[base]:.3f} s wall, {cpu[base]:.3f} s CPU)\n\n"
          f"| variant | step time / {base}, wall | step time / {base}, CPU time |\n|---|---|---|")
    for name in steps:
        print(f"| {name} | {wall[name] / wall[base]:.2f} | {cpu[name] / cpu[base]:.2f} |")
    print(flush=True)


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("+", "-")


def measure(workload: str, vocab: int, names: list[str], batch: int | None, folder: Path,
            keep_steps: bool) -> tuple[dict, dict]:
    """Each variant's probe on ``workload``: figures written to ``folder`` as soon as measured and read
    back from there on a later call (delete a file to measure it again); with ``keep_steps`` every
    variant is measured here and its step function kept, for timing."""
    from memwise.memory import HOST

    folder.mkdir(parents=True, exist_ok=True)
    extra = [f"data.batch_size={batch}"] if batch else []
    results, steps = {}, {}
    for name in names:
        path = folder / f"{slug(name)}.json"
        if path.exists() and not keep_steps:
            results[name] = json.loads(path.read_text())
            print(f"{vocab} {name}: read from {path}", flush=True, file=sys.stderr)
            continue
        start = HOST.current
        t0 = time.perf_counter()
        report, step = probe_and_step(workload, [f"model.config.vocab_size={vocab}", *extra, *VARIANTS[name]])
        head = report.headline()
        head["host"] -= start
        results[name] = {"headline": head, "peak_total": report.peak_total, "at_peak": report.at_peak,
                         "peak_rss": report.peak_rss,
                         "probe_wall_s": round(time.perf_counter() - t0, 1), "overrides": VARIANTS[name]}
        path.write_text(json.dumps(results[name], indent=2) + "\n")
        if keep_steps:
            steps[name] = step
        del step, report  # without --time, keep no model alive between variants
        gc.collect()
        print(f"{vocab} {name}: peak {results[name]['peak_total']} {head} -> {path}", flush=True, file=sys.stderr)
    return results, steps


def quality(workload: str, vocab: int, names: list[str], batch: int | None, steps: int, folder: Path) -> None:
    """Train each variant ``steps`` steps with ``memwise run`` (same seed, data and batches), one
    after the other; a run whose report folder already holds its last checkpoint is not run again."""
    runs = folder / f"quality-{workload}-v{vocab}-b{batch or 'recipe'}-s{steps}"
    for name in names:
        out = runs / slug(name)
        if not (out / "summary.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "memwise", "run", f"recipes/base/{workload}.yaml", QUICK_DATA,
                   f"model.config.vocab_size={vocab}", f"trainer.max_steps={steps}",
                   f"trainer.val_every_n_steps={steps}", "report.plots=false", f"report.dir={out}",
                   *([f"data.batch_size={batch}"] if batch else []), *VARIANTS[name]]
            log = runs / f"{slug(name)}.log"
            print(" ".join(shlex.quote(c) for c in cmd), f"> {log}", flush=True, file=sys.stderr)
            runs.mkdir(parents=True, exist_ok=True)
            with log.open("w") as f:
                subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    rows = {}
    for name in names:
        mem = json.loads((runs / slug(name) / "memory.json").read_text())["measured"]
        rows[name] = (val_history(runs / slug(name)), mem["peak_total"])
    print(f"### {workload}, vocabulary {vocab}, batch {batch or 'of the recipe'}: {steps} training steps "
          f"(`memwise run recipes/base/{workload}.yaml {QUICK_DATA} model.config.vocab_size={vocab} "
          f"trainer.max_steps={steps} ...`)\n")
    print("| variant | val loss step 0 | val loss step %d | vs baseline of its precision | end-to-end peak (MiB) | "
          "peak ratio to bf16-mixed baseline | wall s |\n|---|---|---|---|---|---|---|" % steps)
    for name, (h, peak) in rows.items():
        base = "baseline bf16-mixed" if "bf16" in name else "baseline"
        delta = f"{100 * (h['last'] / rows[base][0]['last'] - 1):+.2f}%" if base in rows else "-"
        ratio = (f"{rows['baseline bf16-mixed'][1] / peak:.2f}x" if "baseline bf16-mixed" in rows else "-")
        print(f"| {name} | {h['first']:.4f} | {h['last']:.4f} | {delta} | {peak / MIB:,.1f} | {ratio} | "
              f"{h['elapsed_s']:.0f} |")
    for ref in COMPOSITIONS:
        if "baseline bf16-mixed" in rows and ref in rows:
            (b, bpeak), (c, cpeak) = rows["baseline bf16-mixed"], rows[ref]
            print(f"\n{ref} vs bf16-mixed AdamW: end-to-end peak {bpeak / cpeak:.2f}x below (goal >= 4x), "
                  f"validation loss {100 * (c['last'] / b['last'] - 1):+.2f}% (goal within 1%)")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--time", action="store_true", help="also time steps (slow)")
    parser.add_argument("--vocab", default="32768,260", help="vocabulary sizes of `small` to run")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--batch", type=int, default=None, help="data.batch_size for every row (default: the workload's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/activations"),
                        help="folder of each variant's figures (written as measured, read back on a later call)")
    parser.add_argument("--quality", default="", metavar="WORKLOAD",
                        help="instead: train each variant --steps steps on this workload (tiny, small) and "
                             "table the validation losses and the runs' measured peaks")
    parser.add_argument("--steps", type=int, default=50, help="training steps for --quality")
    parser.add_argument("--workload", default="small", help="reference workload of the probe tables (small, tiny)")
    parser.add_argument("--head", action="store_true", help="only the LM head + loss at SmolLM2's shapes")
    parser.add_argument("--tiny-time", action="store_true", help="only step-time ratios of the fp32 variants on tiny")
    args = parser.parse_args()
    if args.head:
        head_share(1024, 576, 49152)
        return
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; known: {', '.join(VARIANTS)}")
    print(f"machine: {machine()}\n")
    if args.tiny_time:
        for vocab in [int(v) for v in args.vocab.split(",")]:
            tiny_times(vocab, args.batch or 4, names)
        return
    if args.quality:
        for vocab in [int(v) for v in args.vocab.split(",")]:
            quality(args.quality, vocab, names, args.batch, args.steps, args.out)
        return
    for vocab in [int(v) for v in args.vocab.split(",")]:
        folder = args.out / f"{args.workload}-v{vocab}-b{args.batch or 'recipe'}"
        results, steps = measure(args.workload, vocab, names, args.batch, folder, args.time)
        base = "baseline" if "baseline" in results else names[0]
        print(f"### {args.workload}, vocabulary {vocab}, batch {args.batch or 'of the recipe'}: "
              f"measured memory (MiB; ratio to {base})\n")
        print(memory_table([(n, r["headline"]) for n, r in results.items()], base))
        print(f"\n| variant | end-to-end peak (MiB) | ratio to {base} |\n|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['peak_total'] / MIB:,.1f} | {results[base]['peak_total'] / r['peak_total']:.2f}x |")
        for ref in COMPOSITIONS:
            if "baseline bf16-mixed" in results and ref in results:
                ratio = results["baseline bf16-mixed"]["peak_total"] / results[ref]["peak_total"]
                print(f"\n{ref} vs bf16-mixed AdamW, end-to-end peak: {ratio:.2f}x")
        if args.time:
            t = interleaved({n: steps[n] for n in names if "bf16" not in n})
            print(f"\n| variant | step time / {base} |\n|---|---|")
            for name, sec in t.items():
                print(f"| {name} | {sec / t[base]:.2f} |")
            print(f"\n(median of 5 interleaved; {base} {t[base]:.2f} s a step)")
        print(flush=True)


if __name__ == "__main__":
    main()
