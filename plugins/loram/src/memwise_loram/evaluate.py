"""The last step of LoRAM: the full base model with the recovered adapter, evaluated.

Training happens on the pruned model; what a user deploys is the full model plus the
recovered adapter. So at fit end the full base is loaded again (from its folder) and
scored on the run's validation windows, alone and with the adapter merged.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from memwise_loram.lora import inject_lora, merge_lora
from memwise_loram.peft_format import read_peft


@torch.no_grad()
def val_loss(model: nn.Module, batches: Iterable[dict]) -> float:
    """Target-token-weighted mean loss (labels -100 ignored; HF shifts labels inside the model)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            total += float(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def apply_adapter(model: nn.Module, adapter_folder: str | Path) -> nn.Module:
    """Merge a (recovered, full-shape) PEFT LoRA folder into ``model`` in place."""
    adapters, spec = read_peft(adapter_folder)
    inject_lora(model, spec, freeze=False)
    result = model.load_state_dict(adapters, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"adapter keys that match no module: {result.unexpected_keys[:4]}")
    merge_lora(model)
    return model


def evaluate_recovered(base_folder: str | Path, adapter_folder: str | Path, batches: list[dict]) -> dict[str, float]:
    """Validation loss of the full base and of the full base + recovered adapter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_folder), local_files_only=True, trust_remote_code=False)
    base = val_loss(model, batches)
    recovered = val_loss(apply_adapter(model, adapter_folder), batches)
    return {"base_val_loss": base, "recovered_val_loss": recovered,
            "relative_change": (recovered - base) / base}
