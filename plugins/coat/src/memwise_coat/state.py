"""One CoatAdamW parameter's state: its layout in the state dict, owned here and nowhere else.

A quantized parameter's state holds torch AdamW's ``step`` and, per moment (``exp_avg``,
``exp_avg_sq``), its FP8 codes under the moment's name (shaped like the parameter) and one fp32
tensor per quantization group for each metadata field of the moment's codec
(``exp_avg_scale``, ``exp_avg_expand``, ``exp_avg_centre``...). A parameter that keeps fp32
moments has exactly torch AdamW's state. Every entry stays a plain tensor (a DTensor under
FSDP2), so torch.save with ``weights_only`` loads, DCP and Lightning checkpoints read it as they
read any optimizer state, and state dicts saved before this module keep loading.

Under FSDP2 each rank quantizes its own shard in groups of ``group_size`` (groups never cross a
shard's edge). The codes are a DTensor laid out like the parameter; each metadata field is a
1-D DTensor sharded on dim 0, every rank holding as many groups as the largest shard needs (a
smaller last shard leaves its tail unused), so DCP sees an evenly sharded tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from memwise_coat.groups import group_codecs
from memwise_coat.quantization import MomentCodec, dequantize_groups, quantize_groups

MOMENTS = ("exp_avg", "exp_avg_sq")
STEP = "step"
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_quantized(state: Mapping[str, torch.Tensor]) -> bool:
    """True when a parameter's state holds FP8 moments (else it is torch AdamW's)."""
    return state[MOMENTS[0]].dtype in _FP8


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available() or type(t) is torch.Tensor:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place writes reach it), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _largest_shard_numel(p: torch.Tensor) -> int:
    """Elements of the largest dim-0 shard of DTensor ``p`` (FSDP2 shards as torch.chunk does)."""
    shards = p.device_mesh.size()
    rows = math.ceil(p.shape[0] / shards) if p.ndim else 1
    return rows * (p.numel() // max(p.shape[0], 1) if p.ndim else 1)


@dataclass(frozen=True)
class CoatState:
    """How one param group's quantized parameters store their moments (a codec per moment)."""

    first: MomentCodec
    second: MomentCodec

    @classmethod
    def of_group(cls, group: Mapping) -> CoatState:
        """The layout a CoatAdamW param group's options select."""
        return cls(*group_codecs(group))

    @property
    def codecs(self) -> tuple[MomentCodec, MomentCodec]:
        return self.first, self.second

    def codec(self, moment: str) -> MomentCodec:
        return self.codecs[MOMENTS.index(moment)]

    def metadata_keys(self, moment: str) -> tuple[str, ...]:
        """The state keys of ``moment``'s per-group metadata, in its codec's order."""
        return tuple(f"{moment}_{field}" for field in self.codec(moment).metadata_keys())

    # --- creation and conversion ------------------------------------------------------------

    def create(self, p: torch.Tensor, quantize: bool) -> dict[str, torch.Tensor]:
        """A fresh state for ``p`` (zero moments): FP8 groups when ``quantize``, else torch AdamW's."""
        step = torch.tensor(0.0, dtype=torch.float32)
        if not quantize:
            return {STEP: step, MOMENTS[0]: torch.zeros_like(p, memory_format=torch.preserve_format),
                    MOMENTS[1]: torch.zeros_like(p, memory_format=torch.preserve_format)}
        state = {STEP: step}
        local = local_tensor(p)
        groups_numel = _largest_shard_numel(p) if _is_dtensor(p) else p.numel()
        for moment, c in zip(MOMENTS, self.codecs):
            codes = torch.zeros(local.shape, dtype=c.fmt.dtype, device=local.device)
            state[moment] = self._like(p, codes)
            for key in self.metadata_keys(moment):
                meta = torch.ones(c.num_groups(groups_numel), dtype=torch.float32, device=local.device)
                state[key] = self._groups_like(p, meta)
        return state

    def from_adamw(self, entry: Mapping[str, torch.Tensor], p: torch.Tensor, quantize: bool) -> dict[str, torch.Tensor]:
        """torch AdamW's state of ``p`` (fp32 moments) in this layout: quantized when ``quantize``."""
        if "max_exp_avg_sq" in entry:
            raise ValueError("cannot convert an amsgrad AdamW state to CoatAdamW (it has max_exp_avg_sq)")
        step = torch.as_tensor(entry[STEP], dtype=torch.float32).clone()
        if not quantize:
            return {STEP: step, **{m: entry[m].clone() for m in MOMENTS}}
        state = self.create(p, True)
        state[STEP] = step
        local = self.local(state)
        for moment in MOMENTS:
            self.store(local, moment, local_tensor(entry[moment]).float())
        return state

    def to_adamw(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torch AdamW's state (``step`` and fp32 moments) holding this state's values."""
        if not is_quantized(state):
            return {k: v.clone() for k, v in state.items()}
        local = self.local(state)
        out = {STEP: state[STEP].clone()}
        for moment in MOMENTS:
            out[moment] = self._like(state[moment], self.load(local, moment))
        return out

    # --- reading and writing moments --------------------------------------------------------

    def local(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Plain-tensor views of this rank's part of ``state`` (itself without DTensors): what the
        step, ``load`` and ``store`` work on; writes to them land in ``state``."""
        out = {k: local_tensor(v) for k, v in state.items()}
        if not is_quantized(out):
            return out
        groups = self.first.num_groups(out[MOMENTS[0]].numel())
        for moment in MOMENTS:
            for key in self.metadata_keys(moment):
                if out[key].numel() > groups:  # a smaller shard than the largest leaves a tail unused
                    out[key] = out[key][:groups]
        return out

    def slice(self, state: Mapping[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
        """Views of a (local) quantized state for flat elements [start, stop); ``start`` is a
        multiple of the group size. No ``step``."""
        group = self.first.group_size
        first, last = start // group, -(-stop // group)
        out = {}
        for moment in MOMENTS:
            out[moment] = state[moment].view(-1)[start:stop]
            for key in self.metadata_keys(moment):
                out[key] = state[key][first:last]
        return out

    def metadata(self, state: Mapping[str, torch.Tensor], moment: str) -> dict[str, torch.Tensor]:
        """``moment``'s per-group metadata by codec field (``scale``, ``expand``, ``centre``)."""
        return {field: state[f"{moment}_{field}"] for field in self.codec(moment).metadata_keys()}

    def load(self, state: Mapping[str, torch.Tensor], moment: str) -> torch.Tensor:
        """The dequantized fp32 moment of a local state (shape of its codes)."""
        c = self.codec(moment)
        return dequantize_groups(state[moment], self.metadata(state, moment), c)

    def store(self, state: Mapping[str, torch.Tensor], moment: str, value: torch.Tensor) -> None:
        """Quantize ``value`` into a local state's existing tensors (no new allocations kept)."""
        packed = quantize_groups(value, self.codec(moment), out=state[moment])
        packed.pop("q")
        for field, t in packed.items():
            state[f"{moment}_{field}"].copy_(t)

    def tensors(self, state: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Per moment of a local state, in ``MOMENTS`` order: its codes, then the scale, expansion
        and centre tensors (the scale stands in for the last two without expansion), as the fused
        kernel takes them."""
        out = []
        for moment in MOMENTS:
            meta = self.metadata(state, moment)
            scale = meta["scale"]
            out.append((state[moment], scale, meta.get("expand", scale), meta.get("centre", scale)))
        return out

    # --- sizes ------------------------------------------------------------------------------

    def nbytes(self, numel: int) -> int:
        """Bytes of a quantized state of ``numel`` elements: FP8 payloads and fp32 metadata (no step)."""
        return self.first.nbytes(numel) + self.second.nbytes(numel)

    # --- DTensor wrapping -------------------------------------------------------------------

    @staticmethod
    def _like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``local`` as a DTensor laid out like ``p`` when ``p`` is one, else ``local``."""
        if not _is_dtensor(p):
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    @staticmethod
    def _groups_like(p: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        """Per-group metadata of ``p``'s local shard; a 1-D DTensor sharded on dim 0 when ``p`` is one."""
        if not _is_dtensor(p):
            return meta
        from torch.distributed.tensor import DTensor, Shard

        mesh = p.device_mesh
        return DTensor.from_local(meta, mesh, [Shard(0)], run_check=False, shape=(meta.numel() * mesh.size(),),
                                  stride=(1,))
