"""Save and reload a pruned model (optionally with adapters and an NF4 base).

An HF config describes all layers alike, but pruned layers have fewer KV heads and MLP
channels than unpruned ones. So a folder holds the full model's ``config.json``, the
index map, ``loram.json`` (adapter spec, NF4 settings) and ``model.safetensors``; reloading
builds the HF model from the config, shrinks the pruned layers to the index map's
shapes, re-applies NF4 and adapters, and loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memwise import architectures
from memwise_loram.index_map import IndexMap
from memwise_loram.layout import projection_names
from memwise_loram.lora import LoraSpec, inject_lora
from memwise_loram.structured import resize_layer

WEIGHTS = "model.safetensors"
SETTINGS = "loram.json"


def rebuild(config: Any, imap: IndexMap, device: str | torch.device | None = None) -> nn.Module:
    """The config's HF causal LM (by its architecture adapter) with the pruned shapes of ``imap``."""
    import transformers

    model_class = getattr(transformers, architectures.for_config(config).model_class)
    with torch.device(device or "cpu"):
        model = model_class(config)
    if imap.structured:
        for i, keep in imap.layers.items():
            resize_layer(architectures.for_model(model).decoder_layers(model)[i], imap, keep)
    return model


def save_pruned(model: nn.Module, imap: IndexMap, folder: str | Path, spec: LoraSpec | None = None,
                nf4: dict | None = None) -> Path:
    """Write config, index map, settings and weights (safetensors) into ``folder``."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(folder / "config.json"))
    imap.save(folder)
    settings = {"lora": vars(spec.for_model(model)) if spec else None, "nf4": nf4}
    (folder / SETTINGS).write_text(json.dumps(settings, indent=1))
    save_model(model, str(folder / WEIGHTS))
    return folder


def load_pruned(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, IndexMap, LoraSpec | None]:
    """Rebuild what ``save_pruned`` wrote: (model, index map, adapter spec or None)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    imap = IndexMap.load(folder)
    settings = json.loads((folder / SETTINGS).read_text())
    model = rebuild(config, imap, device)
    if settings.get("nf4"):
        from memwise_loram.nf4_linear import quantize_model

        quantize_model(model, projection_names(config), **settings["nf4"])
    spec = LoraSpec(**settings["lora"]) if settings.get("lora") else None
    if spec is not None:
        inject_lora(model, spec)
    load_model(model, str(folder / WEIGHTS), strict=True, device=str(device))
    return model, imap, spec


def read_adapters(folder: str | Path) -> dict[str, torch.Tensor]:
    """The adapter weights of a saved pruned model, without building the model."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            if ".lora_A." in key or ".lora_B." in key:
                out[key] = f.get_tensor(key)
    return out
