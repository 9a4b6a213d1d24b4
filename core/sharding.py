"""Sharded training: FSDP2 (``fully_shard``) through Lightning's ModelParallelStrategy.

``trainer.strategy: fsdp`` shards every decoder layer, then the root (embeddings, final
norm, head), over all processes (one data-parallel mesh dimension). The same code runs
on CPU with gloo and on a GPU cluster with NCCL. Checkpoints of sharded runs are torch
distributed checkpoint (DCP) folders; :func:`consolidate` turns one into a single
safetensors file that ``from_pretrained`` and ``memwise generate`` read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memwise.errors import MemwiseError
from memwise.schema import option

CONSOLIDATED = "model.safetensors"


@dataclass(kw_only=True)
class FsdpConfig:
    """FSDP2 settings (used when ``trainer.strategy`` is ``fsdp``)."""

    reshard_after_forward: bool = option(True, "free each layer's gathered parameters after its forward "
                                         "(False: keep them until backward, less communication, more memory)")
    cpu_offload: bool = option(False, "keep parameter, gradient and optimizer shards in host memory "
                               "(FSDP2 CPUOffloadPolicy; only meaningful on GPUs)")


def make_strategy(devices: int | str, num_nodes: int) -> Any:
    """Lightning's ModelParallelStrategy with every process on the data-parallel (sharding) axis."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(devices, int):
        raise MemwiseError(f"trainer.strategy=fsdp needs trainer.devices as a number of processes, not '{devices}'")
    return ModelParallelStrategy(data_parallel_size=devices * num_nodes, tensor_parallel_size=1,
                                 save_distributed_checkpoint=True)


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's policy for the recipe's precision: gathered parameters in the compute dtype,
    gradients reduced in fp32 (so shards and the optimizer stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: torch.nn.Module, mesh: Any, precision: str = "32-true",
                config: FsdpConfig | None = None) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root, on ``mesh`` (a 1-D device mesh).

    Layers first so that each layer's parameters are gathered and freed on their own; the
    root keeps what is left (embeddings, final norm, head; tied weights stay together).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from memwise.models import decoder_layers

    config = config or FsdpConfig()
    kwargs = {"mesh": mesh, "mp_policy": mixed_precision_policy(precision),
              "offload_policy": CPUOffloadPolicy() if config.cpu_offload else OffloadPolicy()}
    for _, layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=config.reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds DTensor parameters (it went through ``fully_shard``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def is_dcp_checkpoint(path: str | Path) -> bool:
    """A torch distributed checkpoint folder (what a sharded run saves)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_metadata(path: str | Path) -> dict:
    """The non-tensor part of a sharded checkpoint (Lightning's meta.pt), loaded weights_only."""
    from memwise.checkpoint import safe_load

    return safe_load(Path(path) / "meta.pt")


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model weights of a DCP checkpoint, in one process, no process group.

    Keys are the HF model's own (``model.`` of the LightningModule removed).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not is_dcp_checkpoint(path):
        raise MemwiseError(f"'{path}' is not a sharded (torch distributed checkpoint) folder: it has no .metadata")
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}), no_dist=True)
    return {k.removeprefix("model."): v for k, v in state["state_dict"].items()}


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write a sharded checkpoint's weights as one safetensors file (and config.json when the
    checkpoint's recipe names a model config), loadable with ``from_pretrained(out)``.

    Tied weights (embeddings and head) are written once, as HF does.
    """
    from safetensors.torch import save_file

    state = load_model_state(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(path).get("memwise", {})
    recipe = meta.get("manifest", {}).get("recipe", {})
    config = meta.get("model_config")
    if config:
        (out / "config.json").write_text(json.dumps(config, indent=2))
        if config.get("tie_word_embeddings") and "lm_head.weight" in state:
            state.pop("lm_head.weight")
    seen: dict[int, str] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:  # shared storage (tied weights): safetensors refuses duplicates
            continue
        seen[ptr] = key
        plain[key] = tensor.contiguous()
    save_file(plain, str(out / CONSOLIDATED), metadata={"format": "pt", "source": str(path),
                                                         "world_size": str(meta.get("world_size", "")),
                                                         "recipe": recipe.get("name", "")})
    return out / CONSOLIDATED
