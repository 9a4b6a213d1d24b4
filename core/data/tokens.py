"""Byte-level tokens: ids 0-255 are bytes, specials sit above them (vocabulary 260)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from memwise.schema import option

PAD, BOS, EOD, SEP = 256, 257, 258, 259
VOCAB_SIZE = 260
IGNORE_INDEX = -100


class ByteTokenizer:
    """Bytes in, bytes out; every machine has it and it needs no files."""

    vocab_size = VOCAB_SIZE
    pad_id, bos_id, eod_id, sep_id = PAD, BOS, EOD, SEP

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8", errors="replace") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        raw = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return raw.decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer folder on local disk (never from a hub, never with remote code)."""

    def __init__(self, path: str, gguf_file: str | None = None) -> None:
        from transformers import AutoTokenizer

        extra = {"gguf_file": gguf_file} if gguf_file else {}
        self.path = path
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False, **extra)
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.eod_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.bos_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eod_id
        self.sep_id = self.tok.sep_token_id if self.tok.sep_token_id is not None else self.eod_id

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self.tok.encode(text, add_special_tokens=False), dtype=np.int32)

    def decode(self, ids: Any) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, through the tokenizer's own chat template."""
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class TokenizerConfig:
    """The recipe's one tokenizer, shared by the data, the model's vocabulary and generate."""

    kind: Literal["auto", "bytes", "hf"] = option(
        "auto", "auto: the model folder's own tokenizer with model.path (bytes when the folder has none, "
        "and for models built from a config); bytes: byte tokens (vocabulary 260); hf: the folder in tokenizer.path")
    path: Optional[str] = option(None, "local folder of a HF tokenizer (default: model.path)")


def has_tokenizer(folder: str) -> bool:
    """Whether a local folder holds HF tokenizer files."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_source(cfg: TokenizerConfig, model_path: str | None,
                     gguf_file: str | None = None) -> tuple[str, str | None, str | None]:
    """("bytes" | "hf", folder, gguf file) that ``build_tokenizer`` will load, without loading it."""
    if cfg.kind == "bytes":
        return "bytes", None, None
    if cfg.path is not None:
        return "hf", cfg.path, None
    if model_path is not None and (gguf_file or has_tokenizer(model_path)):
        return "hf", model_path, gguf_file
    if cfg.kind == "hf":
        return "hf", None, None
    return "bytes", None, None


def build_tokenizer(cfg: TokenizerConfig, model_path: str | None = None,
                    gguf_file: str | None = None) -> ByteTokenizer | HFTokenizer:
    """The recipe's tokenizer (see TokenizerConfig.kind)."""
    kind, folder, gguf = tokenizer_source(cfg, model_path, gguf_file)
    if kind == "bytes":
        return ByteTokenizer()
    if folder is None:
        raise ValueError("tokenizer.kind is hf but neither tokenizer.path nor model.path names a folder")
    return HFTokenizer(folder, gguf)


def check_tokenizer(cfg: TokenizerConfig, model_path: str | None, gguf_file: str | None = None) -> list:
    """Problems of the tokenizer section: a folder without tokenizer files, bytes fed to a pretrained model."""
    from memwise.errors import Problem

    problems = []
    if cfg.path is not None and not has_tokenizer(cfg.path):
        problems.append(Problem("tokenizer.path", f"'{cfg.path}' holds no HF tokenizer files "
                                f"({', '.join(TOKENIZER_FILES)}); give a folder saved with save_pretrained"))
    if cfg.kind == "hf" and cfg.path is None and model_path is None:
        problems.append(Problem("tokenizer.path", "tokenizer.kind is hf: name the tokenizer folder here "
                                "(or load the model with model.path, whose folder holds its tokenizer)"))
    if cfg.kind == "hf" and cfg.path is None and model_path is not None and not gguf_file \
            and not has_tokenizer(model_path):
        problems.append(Problem("tokenizer.path", f"tokenizer.kind is hf but the model folder '{model_path}' holds "
                                "no tokenizer files; name a tokenizer folder in tokenizer.path"))
    if cfg.kind == "bytes" and model_path is not None and (gguf_file or has_tokenizer(model_path)):
        problems.append(Problem("tokenizer.kind", f"byte tokens for the pretrained model in '{model_path}', which "
                                "has its own tokenizer: byte ids 0-259 would mean other tokens to it. Remove "
                                "tokenizer.kind (its default, auto, uses the model's own tokenizer)"))
    return problems


def check_vocabulary(corpus: Any, model: Any, tokenizer: Any) -> list:
    """Every token id of the data must be a row of the model's embedding (else indexing garbage or a crash)."""
    from memwise.errors import Problem

    rows = model.get_input_embeddings().num_embeddings
    problems = []
    if tokenizer.vocab_size > rows:
        problems.append(Problem("tokenizer", f"the tokenizer has {tokenizer.vocab_size:,} ids but the model's "
                                f"embedding only {rows:,}: use the model's own tokenizer (tokenizer.kind: auto)"))
    if corpus is not None:
        docs = [d for d in (*corpus.train, *corpus.val) if len(d)]
        top = max((int(d.max()) for d in docs), default=-1)
        if top >= rows:
            problems.append(Problem("data", f"token id {top:,} in the data is outside the model's vocabulary "
                                    f"({rows:,} ids): the data was tokenized for another model; set the "
                                    "recipe's tokenizer to the model's own"))
    return problems
