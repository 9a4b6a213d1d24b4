"""The dataset registry: a recipe's ``data.builder`` names one of these, never an import path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Optional, Union

from memwise.data.corpus import Corpus, from_documents
from memwise.data.documents import glob_documents, pystdlib_documents
from memwise.data.mqar import make_mqar
from memwise.data.tokens import ByteTokenizer, HFTokenizer
from memwise.schema import option, required

Tokenizer = Union[ByteTokenizer, HFTokenizer]


@dataclass(kw_only=True)
class DataConfig:
    """Keys every dataset takes."""

    builder: str = option("pystdlib", "dataset name: pystdlib, pystdlib_sft, text_files, hf or mqar")
    seq_len: int = option(256, "training window length in tokens", ge=2)
    batch_size: int = option(16, "sequences per batch on each device", ge=1)
    val_percent: float = option(5.0, "percent of documents held out for validation (split by name)",
                                 gt=0, lt=100)
    val_batches: int = option(8, "batches scored at each validation", ge=1)
    seed: int = option(0, "seed of the split and of the batch order", ge=0, lt=2 ** 32)
    packing: Literal["window", "concat_chunk"] = option(
        "window", "window: cut each document alone (padded); concat_chunk: concatenate documents and cut "
        "fixed-length chunks (the usual baseline; attention crosses documents)")
    max_documents: Optional[int] = option(None, "use only the first N documents (quick runs)", ge=1)


@dataclass(kw_only=True)
class PyStdlibConfig(DataConfig):
    unit: Literal["file", "definition"] = option(
        "file", "one document per file, or per top-level definition (module prelude, function, class)")


@dataclass(kw_only=True)
class TextFilesConfig(DataConfig):
    paths: list[str] = required("glob pattern(s) of the text files to read, e.g. /usr/include/**/*.h")
    max_bytes_per_file: Optional[int] = option(None, "read at most this many bytes of each file", ge=1)


@dataclass(kw_only=True)
class SftConfig(DataConfig):
    """Keys of the instruction/chat datasets."""

    truncation: Literal["end", "drop"] = option(
        "end", "an example longer than seq_len: end cuts its end (the answer; dropped if no answer token is "
        "left), drop leaves it out")


@dataclass(kw_only=True)
class PyStdlibSftConfig(SftConfig):
    max_answer_chars: int = option(1200, "leave out functions whose source is longer than this")


@dataclass(kw_only=True)
class HFDataConfig(SftConfig):
    format: Literal["jsonl", "json", "parquet", "csv", "text", "disk"] = option(
        "jsonl", "file format (HF datasets' local loaders); disk: a folder written by save_to_disk")
    paths: list[str] = required("local file paths or globs (format disk: the one folder)")
    val_paths: Optional[list[str]] = option(None, "held-out files (default: val_percent of the rows, by row)")
    split: str = option("train", "split to read (a load_from_disk DatasetDict's key)")
    text_column: str = option("text", "column of plain-text documents (every token a target)")
    messages_column: Optional[str] = option(None, "column of chat conversations [{role, content}, ...]; loss on "
                                            "assistant turns")
    prompt_column: Optional[str] = option(None, "column of instructions (with response_column: chat pairs)")
    response_column: Optional[str] = option(None, "column of answers to prompt_column")
    system_prompt: Optional[str] = option(None, "system turn put before each chat example")


@dataclass(kw_only=True)
class MqarConfig(DataConfig):
    num_examples: int = option(20000, "training examples", ge=1)
    num_val_examples: int = option(256, "validation examples (a separate seed)", ge=1)
    num_pairs: int = option(8, "key-value pairs per example", ge=1)
    num_keys: int = option(64, "size of the key vocabulary", ge=1)
    num_values: int = option(64, "size of the value vocabulary", ge=1)
    num_queries: Optional[int] = option(None, "queries per example (default: num_pairs)", ge=1)


def _pystdlib(cfg: PyStdlibConfig, tok: Tokenizer) -> Corpus:
    return from_documents(pystdlib_documents(cfg.unit), tok, cfg.val_percent, cfg.seed, cfg.max_documents)


def _text_files(cfg: TextFilesConfig, tok: Tokenizer) -> Corpus:
    corpus = from_documents(glob_documents(cfg.paths, cfg.max_bytes_per_file), tok, cfg.val_percent, cfg.seed,
                            cfg.max_documents)
    if not corpus.train:
        raise FileNotFoundError(f"data.paths {cfg.paths} matched no readable training file")
    return corpus


def _pystdlib_sft(cfg: PyStdlibSftConfig, tok: Tokenizer) -> Corpus:
    from memwise.data.chat import chat_corpus, stdlib_instructions

    return chat_corpus(stdlib_instructions(cfg.max_answer_chars), tok, cfg.seq_len, cfg.val_percent, cfg.seed,
                       cfg.max_documents, cfg.truncation)


def _hf(cfg: HFDataConfig, tok: Tokenizer) -> Corpus:
    from memwise.data.hf import hf_corpus

    return hf_corpus(cfg, tok)


def _mqar(cfg: MqarConfig, tok: Tokenizer) -> Corpus:
    if not isinstance(tok, ByteTokenizer):
        raise ValueError("mqar is synthetic byte-id data: use byte tokens (remove tokenizer.path / tokenizer.kind)")
    kw = dict(seq_len=cfg.seq_len, num_pairs=cfg.num_pairs, num_keys=cfg.num_keys, num_values=cfg.num_values,
              num_queries=cfg.num_queries)
    train = make_mqar(cfg.num_examples, seed=cfg.seed * 2 + 1, **kw)
    val = make_mqar(cfg.num_val_examples, seed=cfg.seed * 2 + 2, **kw)
    return Corpus(train=[t for t, _ in train], val=[t for t, _ in val], tokenizer=ByteTokenizer(),
                  train_targets=[m for _, m in train], val_targets=[m for _, m in val],
                  stats={"documents": len(train) + len(val), "train_documents": len(train),
                         "val_documents": len(val)})


DATASETS: dict[str, tuple[type, Callable]] = {
    "pystdlib": (PyStdlibConfig, _pystdlib),
    "pystdlib_sft": (PyStdlibSftConfig, _pystdlib_sft),
    "text_files": (TextFilesConfig, _text_files),
    "hf": (HFDataConfig, _hf),
    "mqar": (MqarConfig, _mqar),
}


def build_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> Corpus:
    """The recipe's documents, tokenized with the recipe's tokenizer (byte tokens by default)."""
    return DATASETS[cfg.builder][1](cfg, tokenizer if tokenizer is not None else ByteTokenizer())
