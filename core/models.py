"""The model-builder registry: HF Llama from a config or a local folder, never remote code."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from memwise import architectures
from memwise.architectures.builders import architecture_builders, config_fields
from memwise.errors import Problem
from memwise.schema import option, suggest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    builder: str = option("llama", "model builder (registered): llama, mistral, qwen2, qwen3, gemma2, phi3, gpt2")
    config: dict = option({}, "HF config fields of the builder's config class (LlamaConfig for llama), e.g. hidden_size")
    path: Optional[str] = option(None, "local folder of a pretrained model (config.json + safetensors)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "parameter dtype")
    attn_implementation: Literal["sdpa", "eager"] = option("sdpa", "attention kernel (baselines use sdpa)")


def _llama_fields() -> set[str]:
    from transformers import LlamaConfig

    return {n for n in inspect.signature(LlamaConfig.__init__).parameters if n not in ("self", "kwargs")}


def check_model(cfg: ModelConfig, path: str = "model") -> list[Problem]:
    """Problems of the model section beyond types: builder name, config keys, folder safety."""
    problems = []
    if cfg.builder not in BUILDERS:
        problems.append(Problem(f"{path}.builder", _unknown("model builder", cfg.builder, BUILDERS)))
        return problems
    known = _llama_fields() if cfg.builder == "llama" else config_fields(cfg.builder)
    for key in cfg.config:
        if key not in known:
            problems.append(Problem(f"{path}.config.{key}", f"not a field of the '{cfg.builder}' builder's config"
                                    + suggest(key, known)))
    if cfg.path is not None:
        problems += check_folder(cfg.path, f"{path}.path")
    return problems


def check_folder(folder: str, key: str) -> list[Problem]:
    """A pretrained folder must exist, hold a config.json and ask for no remote code."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        return [Problem(key, f"'{folder}' is not a model folder (no config.json); give a local folder saved with "
                        "save_pretrained; memwise never downloads models")]
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        return [Problem(key, f"{cfg_file} is not valid JSON: {err}")]
    if "auto_map" in data or data.get("trust_remote_code"):
        return [Problem(key, f"{cfg_file} asks for remote code (auto_map); memwise never runs code from a model "
                        "folder. Use a folder whose architecture transformers ships (LlamaForCausalLM)")]
    return []


def _unknown(kind: str, name: str, registry: dict) -> str:
    if "." in name or ":" in name:
        return (f"'{name}' looks like an import path; recipes name a registered {kind} (a recipe must not be "
                f"able to run arbitrary code): {', '.join(registry)}")
    return f"unknown {kind} '{name}'{suggest(name, registry)}; known: {', '.join(registry)}"


def _llama(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.path is not None:
        model = LlamaForCausalLM.from_pretrained(cfg.path, local_files_only=True, trust_remote_code=False,
                                                 dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation)
        for key, value in cfg.config.items():
            setattr(model.config, key, value)
        return model.train()  # from_pretrained returns eval mode; memwise trains it
    fields = {"vocab_size": vocab_size, "pad_token_id": None, **cfg.config}
    config = LlamaConfig(**fields)
    config._attn_implementation = cfg.attn_implementation
    model = LlamaForCausalLM(config)
    return model.to(DTYPES[cfg.dtype])


BUILDERS: dict[str, Any] = {**architecture_builders(), "llama": _llama}


def build_model(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """Build the recipe's model (weights from the seed set by the caller)."""
    return BUILDERS[cfg.builder](cfg, vocab_size)


def decoder_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of each decoder layer of the HF model inside ``model`` (a user's
    LightningModule, a PEFT wrapper), found through its architecture adapter; an architecture
    without one is an error listing the supported ones."""
    return architectures.decoder_layers(model)
