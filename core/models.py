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
    config: dict = option({}, "HF config fields of the builder's config class (LlamaConfig for llama) of a model "
                          "built from a config, e.g. hidden_size; with model.path only runtime fields (use_cache, "
                          "attention_dropout, token ids)")
    path: Optional[str] = option(None, "local folder of a pretrained model (config.json + safetensors, or a GGUF "
                                 "file named in gguf_file)")
    gguf_file: Optional[str] = option(None, "GGUF file inside model.path to load (dequantized to dtype; needs "
                                      "the gguf package: pip install memwise[gguf])")
    override_config: bool = option(False, "with model.path, let model.config change architecture fields of "
                                   "the loaded config (weights that no longer fit are an error)")
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
        problems += check_loaded_config(cfg, path)
        problems += check_gguf(cfg.path, cfg.gguf_file, f"{path}.gguf_file") if cfg.gguf_file \
            else check_folder(cfg.path, f"{path}.path")
    elif cfg.gguf_file is not None:
        problems.append(Problem(f"{path}.gguf_file", "names a file inside model.path; set model.path to its folder"))
    return problems


RUNTIME_FIELDS = frozenset({"use_cache", "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id",
                            "output_attentions", "output_hidden_states"})
"""Config fields a loaded model may take from the recipe: they change no weight and no architecture."""


def check_loaded_config(cfg: ModelConfig, path: str = "model") -> list[Problem]:
    """With model.path the folder's config.json is the architecture; model.config may not change it.

    A recipe that extends a pre-training workload (recipes/base/*.yaml) carries that
    workload's model.config; loading a pretrained model under it would silently cut or
    reshape the model, so each such field is an error unless override_config is set.
    """
    if cfg.override_config:
        return []
    return [Problem(f"{path}.config.{key}", f"changes the architecture of the pretrained model in '{cfg.path}' "
                    "(its config.json decides it). Remove it (an override model.config={} clears the section, "
                    "e.g. one inherited from a pre-training recipe), use a recipes/finetune/ recipe, or set "
                    "model.override_config=true to change the loaded config on purpose")
            for key in cfg.config if key not in RUNTIME_FIELDS]


def check_gguf(folder: str, name: str, key: str) -> list[Problem]:
    """A GGUF file must exist in the folder, and the gguf package must be installed to read it."""
    import importlib.util

    problems = []
    if not (Path(folder) / name).is_file():
        found = sorted(p.name for p in Path(folder).glob("*.gguf")) if Path(folder).is_dir() else []
        problems.append(Problem(key, f"no file '{name}' in '{folder}'"
                                + (f"; GGUF files there: {', '.join(found)}" if found else "")))
    if importlib.util.find_spec("gguf") is None:
        problems.append(Problem(key, "loading a GGUF file needs the gguf package: pip install 'memwise[gguf]'"))
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


def load_pretrained(cls: type, cfg: ModelConfig) -> torch.nn.Module:
    """``cls.from_pretrained`` on the recipe's folder (or GGUF file), the model exactly as saved.

    model.config reaches the loaded model only through the config passed to from_pretrained
    (runtime fields, or any field with override_config), so the model's own config stays
    the one that describes its weights and a saved model reloads with it.
    """
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "dtype": DTYPES[cfg.dtype],
                              "attn_implementation": cfg.attn_implementation}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if cfg.config:
        config = cls.config_class.from_pretrained(cfg.path, local_files_only=True,
                                                  **({"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}))
        for key, value in cfg.config.items():
            setattr(config, key, value)
        kwargs["config"] = config
    model = cls.from_pretrained(cfg.path, **kwargs)
    if cfg.gguf_file:  # dequantized: a plain float model from here on, saved as safetensors
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.is_quantized = False
    return model.train()  # from_pretrained returns eval mode; memwise trains it


def _llama(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.path is not None:
        return load_pretrained(LlamaForCausalLM, cfg)
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
