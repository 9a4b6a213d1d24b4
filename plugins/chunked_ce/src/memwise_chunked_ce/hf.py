"""Hook chunked cross-entropy into an HF causal LM: in training, a call with ``labels``
returns the loss and no logits.

The model's ``forward`` is wrapped in place (an instance attribute, like the
checkpointing plugin), so module names, state-dict keys and tied weights stay as they
are: the head weight is read through ``get_output_embeddings()`` at every call, so tied
embeddings (SmolLM2's lm_head is embed_tokens) get one accumulated gradient. Without
labels, or in eval mode, the original forward runs (generation and evaluation see
logits as usual).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from memwise import NoEffectWarning
from memwise_chunked_ce.function import chunked_linear_cross_entropy

_MARK = "_memwise_chunked_ce"


@dataclass(frozen=True)
class ChunkedCESettings:
    chunk_size: int = 0
    ignore_index: int = -100
    z_loss: float = 0.0


def head_problems(model: torch.nn.Module) -> list[str]:
    """Why this model's LM head cannot be computed in chunks (empty when it can)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not callable(getattr(model, "get_decoder", None)):
        return [f"{type(model).__name__} is not an HF causal LM with an output embedding (get_output_embeddings) "
                "and a decoder (get_decoder)"]
    if type(head) is not torch.nn.Linear:
        return [f"the LM head is a {type(head).__module__}.{type(head).__name__}, not a plain torch.nn.Linear "
                "(was it replaced by another plugin? exclude it there, e.g. mesa exclude: ['*lm_head'])"]
    config = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None) not in (None, 1.0):
            return [f"the model scales its logits ({key}={getattr(config, key)}), which chunked CE does not do"]
    return []


def head_name(model: torch.nn.Module) -> str:
    """Qualified name of the LM head module."""
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def _forward(model: torch.nn.Module, original: Any, settings: ChunkedCESettings, input_ids: Any = None,
             *args: Any, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
    if labels is None or not model.training:
        return original(input_ids, *args, labels=labels, **kwargs)
    if args:
        raise TypeError("chunked CE: pass the model's inputs other than input_ids by keyword")
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    if kwargs.pop("logits_to_keep", 0):
        raise ValueError("chunked CE computes the loss over every position; do not pass logits_to_keep with labels")
    outputs = model.get_decoder()(input_ids=input_ids, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        # as HF's ForCausalLMLoss: position i predicts token i + 1; the last position predicts nothing
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=settings.ignore_index)[..., 1:]
    head = model.get_output_embeddings()
    loss = chunked_linear_cross_entropy(hidden, head.weight, shift_labels, head.bias, settings.chunk_size,
                                        settings.ignore_index, settings.z_loss, num_items)
    rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    return CausalLMOutputWithPast(loss=loss, logits=None, **rest)


def apply_chunked_ce(model: torch.nn.Module, chunk_size: int = 0, ignore_index: int = -100,
                     z_loss: float = 0.0) -> bool:
    """Make ``model(..., labels=...)`` compute its loss in token chunks in training; False when
    already applied (warns). Raises ValueError when the head cannot be chunked."""
    if getattr(model, _MARK, False):
        warnings.warn("apply_chunked_ce changed nothing: the model already computes its loss in chunks",
                      NoEffectWarning, stacklevel=2)
        return False
    problems = head_problems(model)
    if problems:
        raise ValueError(problems[0])
    settings = ChunkedCESettings(chunk_size, ignore_index, z_loss)
    model.forward = functools.partial(_forward, model, model.forward, settings)
    setattr(model, _MARK, True)
    return True


def remove_chunked_ce(model: torch.nn.Module) -> bool:
    """Undo ``apply_chunked_ce``; False when it was not applied."""
    if not getattr(model, _MARK, False):
        return False
    del model.forward
    delattr(model, _MARK)
    return True
