"""memwise-loram: train LoRA on a pruned (optionally NF4) base, recover the adapters for the full model.

Functional API (no framework needed): ``prune``, ``inject_lora``, ``apply_loram``,
``recover``, ``export_recovered``, ``save_pruned`` / ``load_pruned``, ``quantize_nf4``.
Nothing here imports triton; the kernel is imported on first CUDA (or interpreter) use.
"""

from memwise_loram.apply import apply_loram, export_recovered
from memwise_loram.index_map import IndexMap, LayerKeep
from memwise_loram.lora import LoraLinear, LoraSpec, adapter_state, inject_lora, merge_lora
from memwise_loram.kernels import dequantize
from memwise_loram.nf4 import NF4Tensor, quantize_nf4
from memwise_loram.nf4_linear import NF4Linear, quantize_model
from memwise_loram.peft_format import read_peft, write_peft
from memwise_loram.plugin import LoramPlugin
from memwise_loram.prune import prune
from memwise_loram.recovery import recover
from memwise_loram.storage import load_pruned, save_pruned

__all__ = [
    "IndexMap", "LayerKeep", "LoraLinear", "LoraSpec", "LoramPlugin", "NF4Linear", "NF4Tensor", "adapter_state",
    "apply_loram", "dequantize", "export_recovered", "inject_lora", "load_pruned", "merge_lora", "prune",
    "quantize_model", "quantize_nf4", "read_peft", "recover", "save_pruned", "write_peft",
]
