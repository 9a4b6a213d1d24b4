"""LoRAM benchmark: storage of the frozen base, peak training memory, quality after recovery.

    memwise run recipes/loram/base.yaml
    memwise loram save-base runs/loram-base/checkpoints/last.ckpt --out runs/loram-base/model
    python tools/bench/loram.py run --base runs/loram-base/model --steps 100
    python tools/bench/loram.py curve --base .cache/models/SmolLM2-135M-Instruct --ratios 0.1,0.5 --align 0,20

``run``:

1. LLaMA-3.1-70B's shape on the meta device: pruning layers 4-77 at 0.85 (closed form == meta model).
2. Frozen-base storage of LoRA (full), LoRAM and QLoRAM at ratios 0.5 and 0.85: measured bytes
   of the built models == the closed form.
3. Peak training memory (MemTracker, one probe step): PEFT LoRA on the full model vs LoRAM vs QLoRAM.
4. Validation loss on C headers (/usr/include/*.h) after the same steps, seed and data: the base;
   the base + PEFT LoRA trained on the full model; the pruned model + its adapter; the full base
   + the recovered adapter.

``curve``: on a pretrained model with its own tokenizer, the target domain is the offline
standard-library instruction set (pystdlib_sft, loss on the answers). For each pruning ratio x
alignment steps: prune (L2), align on target training windows the LoRA steps never see, train
LoRA, recover, and score the full model with the recovered adapter on the validation answers,
beside the base model and LoRA trained on the full model (same batches, seed and steps).
Frozen-base bytes are counted from the built pruned model and checked against the closed form.
Each setting is written to ``<out>/curve-*.json`` as it finishes (settings may run in separate
processes); the table is printed from every file there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, memory_table  # noqa: E402

from memwise.data.datasets import TextFilesConfig, build_corpus  # noqa: E402
from memwise.data.windows import WindowDataset, collate  # noqa: E402
from memwise.memory import measure_step  # noqa: E402
from memwise_loram import LoraSpec, adapter_state, apply_loram, recover  # noqa: E402
from memwise_loram.counts import base_storage, layer_shapes, llama31_70b_config  # noqa: E402
from memwise_loram.evaluate import apply_adapter, val_loss  # noqa: E402
from memwise_loram.index_map import Geometry, IndexMap, LayerKeep, kept_counts  # noqa: E402
from memwise_loram.peft_format import write_peft  # noqa: E402
from memwise_loram.storage import rebuild  # noqa: E402

NF4 = {"block": 64, "double_quant": True, "dq_block": 256}


def load_base(folder: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="sdpa",
                                                dtype=torch.float32).train()


def frozen_base_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(values, bytes) of every non-adapter parameter and persistent buffer (rotary tables excluded)."""
    values = nbytes = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".lora_" in name or "rotary_emb" in name:
            continue
        nbytes += t.numel() * t.element_size()
        if t.dtype != torch.uint8 and not name.endswith(("absmax", "dq_step", "dq_offset")):
            values += t.numel()
        elif name.endswith("payload"):
            values += 2 * t.numel()
    return values, nbytes


def section_70b() -> dict:
    cfg = llama31_70b_config()
    full = base_storage(cfg, layer_shapes(cfg, 0.0, None), 2)
    pruned = base_storage(cfg, layer_shapes(cfg, 0.85, "4-77"), 2)
    nf4 = base_storage(cfg, layer_shapes(cfg, 0.85, "4-77"), 2, NF4)
    kv, ch = kept_counts(Geometry.of(cfg), 0.85)
    imap = IndexMap.for_config("random", 0.85, cfg, {i: LayerKeep(list(range(kv)), list(range(ch))) for i in range(4, 78)})
    meta = sum(p.numel() for p in rebuild(cfg, imap, "meta").parameters())
    return {"full": full["parameters"], "pruned": pruned["parameters"], "pruned_meta_model": meta,
            "ratio_bf16": full["parameters"] / pruned["parameters"], "paper_nf4_count": pruned["parameters"] // 4,
            "ratio_nf4_paper": full["parameters"] / (pruned["parameters"] / 4),
            "nf4_exact_bytes": nf4["bytes"], "ratio_nf4_exact_bytes": full["bytes"] / nf4["bytes"]}


def section_storage(base: torch.nn.Module, layers: str) -> list[dict]:
    rows = []
    size = next(base.parameters()).element_size()
    for label, ratio, nf4 in (("LoRA (full)", 0.0, None), ("LoRAM 0.5", 0.5, None), ("QLoRAM 0.5", 0.5, NF4),
                              ("LoRAM 0.85", 0.85, None), ("QLoRAM 0.85", 0.85, NF4)):
        model = copy.deepcopy(base)
        apply_loram(model, "random" if ratio else "l2", ratio, layers, LoraSpec(8, 16.0, 0.0), nf4=nf4)
        values, nbytes = frozen_base_bytes(model)
        closed = base_storage(base.config, layer_shapes(base.config, ratio, layers), size, nf4)
        rows.append({"variant": label, "parameters": values, "bytes": nbytes, "closed_form_parameters": closed["parameters"],
                     "closed_form_bytes": closed["bytes"], "equal": values == closed["parameters"] and nbytes == closed["bytes"]})
    return rows


def probe(model: torch.nn.Module, batch: dict) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    report = measure_step(model, opt, lambda: model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
    out = report.headline()
    out["peak_total"] = report.peak_total
    return out


def peft_lora(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets))
    return get_peft_model(model, cfg)


def section_memory(base: torch.nn.Module, batch: dict, layers: str) -> list[tuple[str, dict]]:
    spec = LoraSpec(8, 16.0, 0.05)
    rows = [("PEFT LoRA (full)", probe(peft_lora(copy.deepcopy(base), spec).train(), batch))]
    for label, ratio, nf4 in (("LoRAM 0.5", 0.5, None), ("LoRAM 0.85", 0.85, None), ("QLoRAM 0.85", 0.85, NF4)):
        model = copy.deepcopy(base)
        apply_loram(model, "l2", ratio, layers, spec, nf4=nf4)
        rows.append((label, probe(model.train(), batch)))
    return rows


def train(model: torch.nn.Module, batches: list[dict], lr: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    for batch in batches:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def section_quality(base_folder: str, train_batches: list[dict], val: list[dict], layers: str, lr: float,
                    ratios: list[float], out_dir: Path) -> dict:
    spec = LoraSpec(8, 16.0, 0.05)
    base = load_base(base_folder)
    result = {"base": val_loss(base, val)}
    t = time.perf_counter()
    lora = peft_lora(copy.deepcopy(base), spec)
    train(lora, train_batches, lr)
    result["base + LoRA (full model)"] = val_loss(lora, val)
    result["time LoRA s"] = round(time.perf_counter() - t, 1)
    for ratio in ratios:
        t = time.perf_counter()
        pruned = copy.deepcopy(base)
        imap, _ = apply_loram(pruned, "l2", ratio, layers, spec)
        result[f"pruned {ratio} (no adapter)"] = val_loss(pruned, val)
        train(pruned, train_batches, lr)
        result[f"pruned {ratio} + adapter"] = val_loss(pruned, val)
        folder = write_peft(recover(adapter_state(pruned), imap), spec, out_dir / f"adapter-{ratio}", imap, base_folder)
        full = apply_adapter(load_base(base_folder), folder)
        result[f"full + recovered adapter ({ratio})"] = val_loss(full, val)
        result[f"time LoRAM {ratio} s"] = round(time.perf_counter() - t, 1)
    return result


def sft_batches(base: str, seq_len: int, batch_size: int, documents: int, train_batches: int,
                val_batches: int) -> tuple[list[dict], list[dict]]:
    """Training batches (shuffled, seed 0) and fixed validation batches of the instruction set, model tokenizer."""
    from memwise.data.datasets import PyStdlibSftConfig
    from memwise.data.tokens import HFTokenizer

    tok = HFTokenizer(base)
    corpus = build_corpus(PyStdlibSftConfig(builder="pystdlib_sft", seq_len=seq_len, max_documents=documents), tok)
    train_ds = WindowDataset(corpus.train, seq_len, tok.pad_id, corpus.train_targets)
    val_ds = WindowDataset(corpus.val, seq_len, tok.pad_id, corpus.val_targets)
    b = batch_size
    order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0)).tolist()
    if len(order) < train_batches * b:
        raise SystemExit(f"{len(order)} training windows, {train_batches * b} needed: raise --documents")
    train = [collate([train_ds[i] for i in order[s * b:(s + 1) * b]]) for s in range(train_batches)]
    val = [collate([val_ds[j] for j in range(s * b, min((s + 1) * b, len(val_ds)))])
           for s in range(min(val_batches, math.ceil(len(val_ds) / b)))]
    return train, val


def curve_setting(args: argparse.Namespace, ratio: float | None, align: int, train_batches: list[dict],
                  val: list[dict]) -> dict:
    """One point of the curve. ratio None: LoRA on the full model (no pruning); ratio 0 with align 0: the base."""
    from memwise_loram.align import align_pruned
    from memwise_loram.lora import inject_lora, merge_lora
    from memwise_loram.prune import prune

    spec = LoraSpec(args.rank, 2.0 * args.rank, 0.05)
    lora_batches, align_batches = train_batches[:args.steps], train_batches[args.steps:]
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    model = load_base(args.base)
    config, size = model.config, next(model.parameters()).element_size()
    if ratio is None:
        row = {"setting": "LoRA (full model)", "ratio": 0.0, "align": 0}
        values, nbytes = frozen_base_bytes(model)
        inject_lora(model, spec)
        row["lora_losses"] = train(model, lora_batches, args.lr)
        merge_lora(model)
        row["full_val_loss"] = val_loss(model, val)
    else:
        row = {"setting": f"LoRAM {ratio} align {align}", "ratio": ratio, "align": align}
        imap = prune(model, "l2", ratio, args.layers)
        row["pruned_val_loss"] = val_loss(model, val)
        if align:
            row["align_losses"] = align_pruned(model, align_batches[:align], align, args.align_lr)
            row["aligned_val_loss"] = val_loss(model, val)
        values, nbytes = frozen_base_bytes(model)
        inject_lora(model, spec)
        row["lora_losses"] = train(model, lora_batches, args.lr)
        row["pruned_adapter_val_loss"] = val_loss(model, val)
        folder = write_peft(recover(adapter_state(model), imap), spec, Path(args.out) / f"adapter-{ratio}-{align}",
                            imap, args.base)
        del model
        row["full_val_loss"] = val_loss(apply_adapter(load_base(args.base), folder), val)
    closed = base_storage(config, layer_shapes(config, ratio or 0.0, args.layers), size)
    row.update(frozen_parameters=values, frozen_bytes=nbytes, closed_form_bytes=closed["bytes"],
               bytes_equal=(values, nbytes) == (closed["parameters"], closed["bytes"]),
               seconds=round(time.perf_counter() - t, 1))
    return row


def curve(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    aligns = [int(a) for a in args.align.split(",")]
    train_batches, val = sft_batches(args.base, args.seq_len, args.batch_size, args.documents,
                                     args.steps + max(aligns), args.val_batches)
    settings = [(float(r), a) for r in args.ratios.split(",") if r for a in aligns]
    if args.lora:
        settings.insert(0, (None, 0))
    if args.lora:
        (out / "curve-base.json").write_text(json.dumps({"setting": "base", "full_val_loss": val_loss(load_base(args.base), val)}))
    for ratio, align in settings:
        name = "lora" if ratio is None else f"r{ratio}-a{align}"
        row = curve_setting(args, ratio, align, train_batches, val)
        row["command"] = " ".join(sys.argv)
        (out / f"curve-{name}.json").write_text(json.dumps(row, indent=1))
        print(f"{row['setting']}: full + adapter {row['full_val_loss']:.4f} ({row['seconds']} s)", flush=True)
    print_curve(out)


def print_curve(out: Path) -> None:
    """The table of every setting measured under ``out``, against the base's loss."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("curve-*.json"))]
    base = next(r["full_val_loss"] for r in rows if r["setting"] == "base")
    print(f"\nbase: target val loss {base:.4f}\n")
    print("| setting | pruned | aligned | pruned + adapter | full + recovered adapter | vs base | frozen-base bytes |"
          "\n|---|---|---|---|---|---|---|")
    for r in sorted((r for r in rows if r["setting"] != "base"), key=lambda r: (r["ratio"], r["align"])):
        cells = [f"{r[k]:.4f}" if k in r else "" for k in ("pruned_val_loss", "aligned_val_loss", "pruned_adapter_val_loss")]
        print(f"| {r['setting']} | {' | '.join(cells)} | {r['full_val_loss']:.4f} | "
              f"{100 * (r['full_val_loss'] / base - 1):+.2f}% | {r['frozen_bytes']:,}"
              f"{'' if r['bytes_equal'] else ' (closed form ' + format(r['closed_form_bytes'], ',') + ')'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cp = sub.add_parser("curve", help="ratio x alignment -> target loss of the full model with the recovered adapter")
    cp.add_argument("--base", required=True, help="pretrained model folder with its tokenizer")
    cp.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    cp.add_argument("--align", default="0,20", help="alignment steps (full-parameter training of the pruned model)")
    cp.add_argument("--lora", action="store_true", help="also the references: the base, LoRA on the full model")
    cp.add_argument("--layers", default="1-28", help="layers to prune (first and last kept, as the paper does)")
    cp.add_argument("--steps", type=int, default=40, help="LoRA steps")
    cp.add_argument("--batch-size", type=int, default=4)
    cp.add_argument("--seq-len", type=int, default=256)
    cp.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (AdamW, cosine to 0.1x)")
    cp.add_argument("--align-lr", type=float, default=5e-5)
    cp.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank, dropout 0.05)")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--documents", type=int, default=2000, help="instruction-set examples (max_documents)")
    cp.add_argument("--val-batches", type=int, default=8)
    cp.add_argument("--out", default="runs/bench-loram-curve")
    cp.add_argument("--table", action="store_true", help="only print the table of what --out holds")
    ap = sub.add_parser("run", help="storage, memory and quality on the byte-token base of recipes/loram")
    ap.add_argument("--base", required=True, help="base model folder (from recipes/loram/base.yaml + save-base)")
    ap.add_argument("--layers", default="1-6", help="layers to prune (the paper keeps the first and last ones)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ratios", default="0.5,0.85")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default="runs/bench-loram")
    args = parser.parse_args()
    if args.command == "curve":
        print(f"machine: {machine()}\n")
        print_curve(Path(args.out)) if args.table else curve(args)
        return
    torch.manual_seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}\n")

    r70 = section_70b()
    print("## LLaMA-3.1-70B shape, layers 4-77 pruned at 0.85 (meta device)\n")
    print(f"full {r70['full']:,} -> pruned {r70['pruned']:,} (meta model {r70['pruned_meta_model']:,}): "
          f"{r70['ratio_bf16']:.2f}x; paper's NF4 count {r70['paper_nf4_count']:,}: {r70['ratio_nf4_paper']:.2f}x; "
          f"exact NF4 bytes (scales, bf16 embeddings/head) {r70['nf4_exact_bytes']:,}: "
          f"{r70['ratio_nf4_exact_bytes']:.2f}x vs bf16\n")

    base = load_base(args.base)
    storage = section_storage(base, args.layers)
    print(f"## Frozen-base storage (base {args.base}, layers {args.layers})\n")
    print("| variant | parameters | bytes | closed form bytes | equal | vs LoRA |\n|---|---|---|---|---|---|")
    for row in storage:
        print(f"| {row['variant']} | {row['parameters']:,} | {row['bytes']:,} | {row['closed_form_bytes']:,} | "
              f"{row['equal']} | {storage[0]['bytes'] / row['bytes']:.2f}x |")

    corpus = build_corpus(TextFilesConfig(builder="text_files", paths=["/usr/include/*.h"], seq_len=args.seq_len, batch_size=args.batch_size))
    pad = corpus.tokenizer.pad_id
    train_ds = WindowDataset(corpus.train, args.seq_len, pad)
    val_ds = WindowDataset(corpus.val, args.seq_len, pad)
    order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(0)).tolist()
    b = args.batch_size
    train_batches = [collate([train_ds[i] for i in order[s * b:(s + 1) * b]]) for s in range(args.steps)]
    vorder = torch.randperm(len(val_ds), generator=torch.Generator().manual_seed(1234)).tolist()[:8 * b]
    val = [collate([val_ds[i] for i in vorder[j:j + b]]) for j in range(0, len(vorder), b)]

    mem = [] if args.skip_memory else section_memory(base, train_batches[0], args.layers)
    if mem:
        print(f"\n## Peak training memory, one step, batch {b} x {args.seq_len} (MemTracker, MiB; ratio vs PEFT LoRA)\n")
        print(memory_table([(n, m) for n, m in mem], "PEFT LoRA (full)"))
        print("| peak total | " + " | ".join(f"{m['peak_total'] / 2**20:,.2f}" for _, m in mem) + " |")

    quality = {}
    if not args.skip_quality:
        ratios = [float(r) for r in args.ratios.split(",")]
        quality = section_quality(args.base, train_batches, val, args.layers, args.lr, ratios, out_dir)
        print(f"\n## Validation loss on C headers after {args.steps} steps (batch {b} x {args.seq_len}, lr {args.lr})\n")
        print("| model | val loss | vs base |\n|---|---|---|")
        for k, v in quality.items():
            if not k.startswith("time"):
                print(f"| {k} | {v:.4f} | {100 * (v / quality['base'] - 1):+.1f}% |")
        print("\n" + ", ".join(f"{k}: {v}" for k, v in quality.items() if k.startswith("time")))
    (out_dir / "loram.json").write_text(json.dumps({"70b": r70, "storage": storage, "memory": dict(mem),
                                                    "quality": quality}, indent=1))


if __name__ == "__main__":
    main()
