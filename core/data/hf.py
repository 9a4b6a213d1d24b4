"""A user's data through HF ``datasets``, from local files only: JSONL, parquet, CSV, text, saved folders.

The recipe names the columns: a text column (documents, every token a target), a
messages column (chat, loss on the assistant turns), or a prompt and a response column
(instruction pairs, rendered as a conversation). Nothing is fetched from a hub: files are
local paths or globs, and a saved folder is read with ``load_from_disk``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from typing import Any

from memwise.data.chat import chat_corpus, pair_to_messages
from memwise.data.corpus import Corpus, from_documents

FORMATS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "text": "text"}


def _files(patterns: list[str], key: str) -> list[str]:
    found = sorted({p for pat in patterns for p in glob.glob(os.path.expanduser(pat), recursive=True)
                    if os.path.isfile(p)})
    if not found:
        raise FileNotFoundError(f"{key} {patterns} matched no file")
    return found


def load_rows(fmt: str, paths: list[str], split: str, key: str = "data.paths") -> Any:
    """A ``datasets.Dataset`` read from local files (or a load_from_disk folder when fmt is disk)."""
    import datasets

    if fmt == "disk":
        if len(paths) != 1 or not os.path.isdir(paths[0]):
            raise FileNotFoundError(f"{key}: format disk reads one folder written by save_to_disk, got {paths}")
        loaded = datasets.load_from_disk(paths[0])
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"data.split '{split}' is not in {paths[0]}; its splits: {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded
    files = _files(paths, key)
    return datasets.load_dataset(FORMATS[fmt], data_files={split: files}, split=split)


def _column(rows: Any, name: str, key: str) -> None:
    if name not in rows.column_names:
        raise KeyError(f"{key}: no column '{name}' in the data; its columns: {', '.join(rows.column_names)}")


def _examples(rows: Any, cfg: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(name, messages) per row for chat data, (name, text) for documents."""
    if cfg.messages_column:
        _column(rows, cfg.messages_column, "data.messages_column")
        for i, value in enumerate(rows[cfg.messages_column]):
            head = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
            yield f"{prefix}{i}", head + list(value or [])
    elif cfg.prompt_column or cfg.response_column:
        if not (cfg.prompt_column and cfg.response_column):
            raise KeyError("data.prompt_column and data.response_column go together (an instruction and its answer)")
        _column(rows, cfg.prompt_column, "data.prompt_column")
        _column(rows, cfg.response_column, "data.response_column")
        for i, (p, r) in enumerate(zip(rows[cfg.prompt_column], rows[cfg.response_column])):
            yield f"{prefix}{i}", pair_to_messages(str(p), str(r), cfg.system_prompt)
    else:
        _column(rows, cfg.text_column, "data.text_column")
        for i, text in enumerate(rows[cfg.text_column]):
            yield f"{prefix}{i}", (text or "").encode("utf-8")


def hf_corpus(cfg: Any, tokenizer: Any) -> Corpus:
    """The recipe's rows as a corpus: held-out rows from val_paths, or a split by row name."""
    chat = bool(cfg.messages_column or cfg.prompt_column or cfg.response_column)
    parts = [("", load_rows(cfg.format, cfg.paths, cfg.split))]
    if cfg.val_paths:
        parts.append(("val:", load_rows(cfg.format, cfg.val_paths, cfg.split, "data.val_paths")))

    def build(rows: Any, prefix: str, val_percent: float) -> Corpus:
        examples = _examples(rows, cfg, prefix)
        if chat:
            return chat_corpus(examples, tokenizer, cfg.seq_len, val_percent, cfg.seed, cfg.max_documents,
                               cfg.truncation)
        return from_documents(examples, tokenizer, val_percent, cfg.seed, cfg.max_documents)

    if not cfg.val_paths:
        corpus = build(parts[0][1], "", cfg.val_percent)
    else:
        corpus = build(parts[0][1], "", 0.0)
        held = build(parts[1][1], "val:", 100.0)
        corpus.val, corpus.val_targets = held.val, held.val_targets
        corpus.stats["val_documents"] = len(held.val)
    if not corpus.train:
        raise ValueError(f"data.paths {cfg.paths}: no training example left (empty rows, or every one held out)")
    return corpus
