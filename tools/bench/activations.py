"""Activation techniques side by side on `small` and on `small` with a 32k vocabulary: baseline,
checkpointing, Mesa, offload, offload + Mesa, chunked CE and the full composition
(COAT optimizer + Mesa + chunked CE + offload), each category, end-to-end peak, step time.

    python tools/bench/activations.py [--time] [--vocab 32768,260] [--only a,b]
    python tools/bench/activations.py --head        # LM head + loss alone at SmolLM2's shapes
    python tools/bench/activations.py --tiny-time   # step-time ratios on tiny's shape, 32k vocabulary

Memory is measured exactly with MemTracker on a probe step (DESIGN.md section 7); host bytes
(offload) come from the host ledger, counted for this variant only. Step times are medians of
interleaved runs (A B A B ...), as ratios to the baseline of the same run.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import interleaved, machine, memory_table, probe_and_step  # noqa: E402

MESA = "{use: mesa, with: {exclude: ['*lm_head']}}"
OFFLOAD = "{use: offload, with: {layers: all, fraction: 1.0, prefetch: 1}}"
CE = "{use: chunked_ce}"
COAT = "{use: coat, with: {activations: false}}"
VARIANTS = {
    "baseline": [],
    "checkpointing": ["plugins=[{use: checkpointing, with: {layers: all}}]"],
    "mesa": [f"plugins=[{MESA}]"],
    "offload": [f"plugins=[{OFFLOAD}]"],
    "offload+mesa": [f"plugins=[{MESA}, {OFFLOAD}]"],
    "chunked_ce": [f"plugins=[{CE}]"],
    "composition": [f"plugins=[{COAT}, {MESA}, {CE}, {OFFLOAD}]"],
    "baseline bf16-mixed": ["trainer.precision=bf16-mixed"],
    "composition bf16-mixed": ["trainer.precision=bf16-mixed", f"plugins=[{COAT}, {MESA}, {CE}, {OFFLOAD}]"],
}


def head_share(tokens: int, hidden: int, vocab: int) -> None:
    """The LM head + loss alone under MemTracker: peak bytes above the hidden states, the weight
    and their gradients (which both paths hold), HF's path (linear + cross-entropy) vs chunked."""
    from memwise_chunked_ce import auto_chunk_size
    from memwise_chunked_ce.measure import head_loss_peaks

    base, chunked = head_loss_peaks(tokens, hidden, vocab)
    chunk = auto_chunk_size(tokens, hidden, vocab)
    print(f"head + loss alone, {tokens} tokens, hidden {hidden}, vocabulary {vocab} (chunk {chunk}): "
          f"{base / 2**20:,.1f} MiB -> {chunked / 2**20:,.1f} MiB ({base / chunked:.1f}x)\n")


def tiny_times(vocab: int, batch: int, seq: int) -> None:
    """Step time ratios on `tiny`'s model shape (hidden 256, 4 layers) with one fixed batch, interleaved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from memwise_chunked_ce import apply_chunked_ce
    from memwise_offload import apply_offload

    def model(apply=None):
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=688, vocab_size=vocab,
                                         pad_token_id=None))
        if apply:
            apply(m)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        ids = torch.randint(0, 260, (batch, seq))

        def step() -> None:
            m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    fns = {"baseline": model(), "chunked_ce": model(apply_chunked_ce), "offload": model(apply_offload),
           "offload fraction 0.5": model(lambda m: apply_offload(m, fraction=0.5)),
           "checkpoint-like (offload fraction 0)": model(lambda m: apply_offload(m, fraction=0.0))}
    t = interleaved(fns)
    print(f"step time on tiny's shape, vocabulary {vocab}, batch {batch} x {seq} (median of 5 interleaved; "
          f"baseline {t['baseline']:.2f} s):\n\n| variant | step time / baseline |\n|---|---|")
    for name, sec in t.items():
        print(f"| {name} | {sec / t['baseline']:.2f} |")


def main() -> None:
    from memwise.memory import HOST

    parser = argparse.ArgumentParser()
    parser.add_argument("--time", action="store_true", help="also time steps (slow)")
    parser.add_argument("--vocab", default="32768,260", help="vocabulary sizes of `small` to run")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--head", action="store_true", help="only the LM head + loss at SmolLM2's shapes")
    parser.add_argument("--tiny-time", action="store_true", help="only step-time ratios on tiny's shape")
    args = parser.parse_args()
    if args.head:
        head_share(1024, 576, 49152)
        return
    if args.tiny_time:
        tiny_times(32768, 4, 256)
        return
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    print(f"machine: {machine()}\n")
    for vocab in [int(v) for v in args.vocab.split(",")]:
        reports, steps = {}, {}
        for name in names:
            start = HOST.current
            report, step = probe_and_step("small", [f"model.config.vocab_size={vocab}", *VARIANTS[name]])
            head = report.headline()
            head["host"] -= start
            reports[name] = (report, head)
            if args.time:
                steps[name] = step
            del step  # without --time, keep no model alive between variants
            gc.collect()
            print(f"{vocab} {name}: peak {report.peak_total} {head}", flush=True, file=sys.stderr)
        print(f"### small, vocabulary {vocab}: measured memory (MiB; ratio to baseline)\n")
        print(memory_table([(n, h) for n, (_, h) in reports.items()], names[0]))
        print("\n| variant | end-to-end peak (MiB) | ratio to baseline |\n|---|---|---|")
        base = reports[names[0]][0].peak_total
        for name, (report, _) in reports.items():
            print(f"| {name} | {report.peak_total / 2**20:,.1f} | {base / report.peak_total:.2f}x |")
        if "baseline bf16-mixed" in reports and "composition bf16-mixed" in reports:
            ratio = reports["baseline bf16-mixed"][0].peak_total / reports["composition bf16-mixed"][0].peak_total
            print(f"\ncomposition vs bf16-mixed AdamW, end-to-end peak: {ratio:.2f}x")
        if args.time:
            t = interleaved({n: steps[n] for n in names if "bf16" not in n})
            print("\n| variant | step time / baseline |\n|---|---|")
            for name, sec in t.items():
                print(f"| {name} | {sec / t[names[0]]:.2f} |")
            print(f"\n(median of 5 interleaved; baseline {t[names[0]]:.2f} s a step)")
        print(flush=True)


if __name__ == "__main__":
    main()
