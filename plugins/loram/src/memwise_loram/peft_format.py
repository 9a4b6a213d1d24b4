"""PEFT's adapter folder format: ``adapter_model.safetensors`` + ``adapter_config.json``.

PEFT saves keys as ``base_model.model.<module>.lora_A.weight`` (no adapter name), with
``lora_A`` [r, in], ``lora_B`` [out, r] and scaling alpha / r; writing that format lets a
user load a recovered adapter with ``PeftModel.from_pretrained`` on the full base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memwise_loram.index_map import IndexMap
from memwise_loram.lora import LoraSpec

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_config(spec: LoraSpec, base_model: str | None = None) -> dict:
    """The adapter_config.json of a plain LoRA adapter for causal LM."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": sorted(spec.targets), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None}


def write_peft(adapters: dict[str, torch.Tensor], spec: LoraSpec, folder: str | Path,
               imap: IndexMap | None = None, base_model: str | None = None) -> Path:
    """Write full-shape adapters (``adapter_state`` keys) as a PEFT folder, plus the index map sidecar."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapters.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(peft_config(spec, base_model), indent=1))
    if imap is not None:
        imap.save(folder)
    return folder


def read_peft(folder: str | Path) -> tuple[dict[str, torch.Tensor], LoraSpec]:
    """Adapters (our keys) and spec from a PEFT LoRA folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    spec = LoraSpec(int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0)),
                    list(cfg["target_modules"]))
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    return {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}, spec
