"""Byte-level tokens: ids 0-255 are bytes, specials sit above them (vocabulary 260)."""

from __future__ import annotations

from typing import Any

import numpy as np

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

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
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
