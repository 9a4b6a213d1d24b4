"""``memwise loram export`` and ``memwise loram save-base``: files a user can take elsewhere.

``export`` turns the adapters of a LoRAM run (a memwise checkpoint, or a folder written
by ``save_pruned``) into a PEFT adapter folder for the full base model. ``save-base``
writes the model of a plain memwise checkpoint as an HF folder (``save_pretrained``), so a
LoRAM recipe can load a base trained by memwise through ``model.path``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from memwise_loram.index_map import INDEX_MAP_FILE, IndexMap
from memwise_loram.lora import LoraSpec


def add_commands(subparsers: Any) -> None:
    """Register ``loram export`` and ``loram save-base`` under the memwise CLI."""
    parser = subparsers.add_parser("loram", help="LoRAM: export recovered adapters, save a trained base")
    sub = parser.add_subparsers(dest="loram_command", required=True)
    p = sub.add_parser("export", help="recover a LoRAM adapter to the full model's shapes, in PEFT's format")
    p.add_argument("source", help="memwise checkpoint (.ckpt) of a LoRAM run, or a folder written by save_pruned")
    p.add_argument("--out", required=True, help="output folder (adapter_model.safetensors + adapter_config.json)")
    p.add_argument("--base-model", default=None, help="full base model folder, recorded in adapter_config.json")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("save-base", help="write the model of a memwise checkpoint as an HF model folder")
    p.add_argument("checkpoint", help="memwise checkpoint (.ckpt) of a run without pruning")
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    p.set_defaults(func=cmd_save_base)


def _from_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], IndexMap, LoraSpec]:
    from memwise.checkpoint import safe_load
    from memwise.errors import MemwiseError

    ckpt = safe_load(path)
    state = (ckpt.get("memwise", {}).get("plugins", {}) or {}).get("loram")
    if not state:
        raise MemwiseError(f"{path} holds no loram state: it was not made by a run with the loram plugin")
    adapters = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
                if ".lora_A." in k or ".lora_B." in k}
    return adapters, IndexMap.from_dict(state["index_map"]), LoraSpec(**state["lora"])


def _from_folder(folder: Path) -> tuple[dict[str, torch.Tensor], IndexMap, LoraSpec]:
    from memwise.errors import MemwiseError
    from memwise_loram.storage import SETTINGS, read_adapters

    settings = json.loads((folder / SETTINGS).read_text())
    if not settings.get("lora"):
        raise MemwiseError(f"{folder} holds a pruned model without adapters: nothing to export")
    return read_adapters(folder), IndexMap.load(folder), LoraSpec(**settings["lora"])


def cmd_export(args: argparse.Namespace) -> int:
    """Recover and write the adapter; print what was written."""
    from memwise.errors import MemwiseError
    from memwise_loram.peft_format import write_peft
    from memwise_loram.recovery import recover

    source = Path(args.source)
    if source.is_dir() and (source / INDEX_MAP_FILE).is_file():
        adapters, imap, spec = _from_folder(source)
    elif source.is_file():
        adapters, imap, spec = _from_checkpoint(source)
    else:
        raise MemwiseError(f"'{source}' is neither a memwise checkpoint nor a folder written by save_pruned "
                           f"(no {INDEX_MAP_FILE})")
    if not adapters:
        raise MemwiseError(f"'{source}' holds no adapter weights (no lora_A / lora_B keys)")
    out = write_peft(recover(adapters, imap), spec, args.out, imap, args.base_model)
    print(f"wrote {len(adapters) // 2} recovered adapters ({imap.method}, ratio {imap.ratio}, "
          f"{len(imap.layers)} pruned layers) to {out}")
    return 0


def cmd_save_base(args: argparse.Namespace) -> int:
    """Rebuild the HF model (the recipe's builder's architecture) from the checkpoint's manifest and weights;
    save_pretrained it."""
    import transformers

    from memwise import architectures
    from memwise.checkpoint import safe_load
    from memwise.errors import MemwiseError

    ckpt = safe_load(args.checkpoint)
    recipe = ckpt.get("memwise", {}).get("manifest", {}).get("recipe", {})
    if any(p.get("use") == "loram" for p in recipe.get("plugins", []) or []):
        raise MemwiseError("this checkpoint is of a LoRAM run (pruned); use 'memwise loram export' for its adapter")
    adapter = architectures.get(str((recipe.get("model") or {}).get("builder") or "llama"))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    fields = dict((recipe.get("model") or {}).get("config") or {})
    fields.update(vocab_size=state[f"{adapter.backbone}.{adapter.embed}.weight"].shape[0], pad_token_id=None)
    model = getattr(transformers, adapter.model_class)(getattr(transformers, adapter.config_class)(**fields))
    model.load_state_dict(state)
    model.save_pretrained(args.out)
    print(f"wrote {sum(p.numel() for p in model.parameters()):,} parameters to {args.out}")
    return 0
