"""The whole technique as plain functions: prune (+ align) (+ NF4) + adapters, then recover and export."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import nn

from memwise_loram.index_map import IndexMap
from memwise_loram.layout import projection_names
from memwise_loram.lora import LoraSpec, adapter_state, inject_lora
from memwise_loram.peft_format import write_peft
from memwise_loram.prune import prune
from memwise_loram.recovery import recover


def apply_loram(model: nn.Module, method: str = "l2", ratio: float = 0.5, layers: str | Iterable[int] | None = None,
                spec: LoraSpec | None = None, calibration: Sequence | None = None, seed: int = 0,
                nf4: dict | None = None, align: dict | None = None) -> tuple[IndexMap, list[str]]:
    """Prune ``model`` in place, optionally align and NF4-quantize it, then inject adapters.

    The order is the paper's: prune, (align: full-parameter training of the pruned model,
    ``align = {"batches": ..., "steps": ..., "lr": ...}``), (quantize the frozen base:
    ``nf4 = {"block", "double_quant", "dq_block"}``), adapters last. Returns the index
    map and the names of the adapted projections; only the adapters train afterwards.
    """
    spec = spec or LoraSpec()
    imap = prune(model, method, ratio, layers, calibration, seed)
    if align:
        from memwise_loram.align import align_pruned

        align_pruned(model, **align)
    if nf4:
        from memwise_loram.nf4_linear import quantize_model

        quantize_model(model, projection_names(model), **nf4)
    names = inject_lora(model, spec)
    return imap, names


def export_recovered(model: nn.Module, imap: IndexMap, spec: LoraSpec, folder: str | Path,
                     base_model: str | None = None) -> Path:
    """Recover the adapters of a pruned model to the full shapes and write them as a PEFT folder."""
    return write_peft(recover(adapter_state(model), imap), spec.for_model(model), folder, imap, base_model)
