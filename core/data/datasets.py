"""The dataset registry: a recipe's ``data.builder`` names one of these, never an import path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Optional

from memwise.data.corpus import Corpus, from_documents
from memwise.data.documents import glob_documents, pystdlib_documents
from memwise.data.mqar import make_mqar
from memwise.data.tokens import ByteTokenizer, HFTokenizer
from memwise.schema import option, required


@dataclass(kw_only=True)
class DataConfig:
    """Keys every dataset takes."""

    builder: str = option("pystdlib", "dataset name: pystdlib, text_files or mqar")
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
    tokenizer: Optional[str] = option(None, "local folder of a HF tokenizer; byte tokens when unset")
    max_bytes_per_file: Optional[int] = option(None, "read at most this many bytes of each file", ge=1)


@dataclass(kw_only=True)
class MqarConfig(DataConfig):
    num_examples: int = option(20000, "training examples", ge=1)
    num_val_examples: int = option(256, "validation examples (a separate seed)", ge=1)
    num_pairs: int = option(8, "key-value pairs per example", ge=1)
    num_keys: int = option(64, "size of the key vocabulary", ge=1)
    num_values: int = option(64, "size of the value vocabulary", ge=1)
    num_queries: Optional[int] = option(None, "queries per example (default: num_pairs)", ge=1)


def _pystdlib(cfg: PyStdlibConfig) -> Corpus:
    return from_documents(pystdlib_documents(cfg.unit), ByteTokenizer(), cfg.val_percent, cfg.seed, cfg.max_documents)


def _text_files(cfg: TextFilesConfig) -> Corpus:
    tok = HFTokenizer(cfg.tokenizer) if cfg.tokenizer else ByteTokenizer()
    corpus = from_documents(glob_documents(cfg.paths, cfg.max_bytes_per_file), tok, cfg.val_percent, cfg.seed,
                            cfg.max_documents)
    if not corpus.train:
        raise FileNotFoundError(f"data.paths {cfg.paths} matched no readable training file")
    return corpus


def _mqar(cfg: MqarConfig) -> Corpus:
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
    "text_files": (TextFilesConfig, _text_files),
    "mqar": (MqarConfig, _mqar),
}


def build_corpus(cfg: DataConfig) -> Corpus:
    return DATASETS[cfg.builder][1](cfg)
