"""Instruction and chat examples: rendered with the tokenizer's chat template, loss on the answers only.

A conversation is rendered turn by turn: the text before each assistant turn is the
template's own rendering of the earlier turns plus its generation prompt (exactly what the
model sees at generation time), and the assistant turn is what the template adds after it.
Only the assistant turns' tokens (their content and the template's end-of-turn marker) are
targets. An example longer than the training window is truncated at its end (the answer is
cut; an example left with no answer token is dropped) or, with ``truncation: drop``, left out.
"""

from __future__ import annotations

import ast
import sysconfig
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memwise.data.corpus import Corpus
from memwise.data.documents import is_validation, stdlib_files

ROLES = ("system", "user", "assistant")


def _plain_render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """A template for tokenizers without one (byte tokens): '### role' headers."""
    text = "".join(f"### {m['role']}\n{m['content']}\n" for m in messages)
    return text + ("### assistant\n" if add_generation_prompt else "")


def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template (a plain one when it has none)."""
    if getattr(tokenizer, "has_chat_template", False):
        return tokenizer.render(messages, add_generation_prompt)
    return _plain_render(messages, add_generation_prompt)


def check_messages(messages: Any, where: str) -> list[dict]:
    """A list of {role, content} with at least one assistant turn, or a ValueError naming the example."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}}, got {messages!r:.80}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each message is {{role: system|user|assistant, content: text}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant turn, so nothing to train on")
    return out


def encode_chat(tokenizer: Any, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, target mask): True on the assistant turns' tokens."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg["role"] == "assistant":
            prompt = render(tokenizer, messages[:k], add_generation_prompt=True) if k else ""
            full = render(tokenizer, messages[:k + 1])
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError("the chat template does not render a conversation as a prefix of its "
                                 "continuation, so the assistant turns cannot be located")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        else:
            full = render(tokenizer, messages[:k + 1])
            if not full.startswith(done):
                raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
            pieces.append((full[len(done):], False))
        done = full
    ids, mask = [], []
    for text, target in pieces:
        if text:
            piece = tokenizer.encode(text).tolist()
            ids += piece
            mask += [target] * len(piece)
    if not getattr(tokenizer, "has_chat_template", False):  # the plain template has no markers: add ours
        ids, mask = [tokenizer.bos_id, *ids, tokenizer.eod_id], [False, *mask, True]
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def chat_corpus(examples: Iterable[tuple[str, list[dict]]], tokenizer: Any, seq_len: int, val_percent: float,
                seed: int = 0, max_documents: int | None = None, truncation: str = "end") -> Corpus:
    """Encode (name, messages) examples, truncate or drop the long ones, split by name."""
    train, val, train_t, val_t = [], [], [], []
    stats = {"documents": 0, "truncated": 0, "dropped_too_long": 0, "answer_tokens": 0}
    for name, messages in examples:
        if max_documents is not None and stats["documents"] >= max_documents:
            break
        ids, mask = encode_chat(tokenizer, check_messages(messages, name))
        if len(ids) > seq_len:
            if truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
            ids, mask = ids[:seq_len], mask[:seq_len]
            stats["truncated"] += 1
            if not mask[1:].any():
                stats["dropped_too_long"] += 1
                continue
        stats["documents"] += 1
        stats["answer_tokens"] += int(mask[1:].sum())
        held_out = is_validation(name, val_percent, seed)
        (val if held_out else train).append(ids)
        (val_t if held_out else train_t).append(mask)
    stats.update(train_documents=len(train), val_documents=len(val))
    return Corpus(train=train, val=val, tokenizer=tokenizer, train_targets=train_t, val_targets=val_t, stats=stats)


def pair_to_messages(prompt: str, response: str, system: str | None = None) -> list[dict]:
    """A prompt/response pair as a conversation (with an optional system turn)."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Top-level functions and the methods of top-level classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def stdlib_instructions(max_answer_chars: int = 1200, root: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """An offline instruction set from the Python standard library.

    Each documented function with a body beyond its docstring is one example: the prompt
    gives its module, signature and docstring, the answer is the whole function. Files are
    read in sorted order (test packages left out), so the set is the same on every run.
    """
    base = Path(root or sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(root):
        rel = path.relative_to(base)
        if {"test", "tests", "idle_test"} & set(rel.parts[:-1]):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for fn in _functions(tree):
            doc = ast.get_docstring(fn)
            if not doc or len(fn.body) < 2:
                continue
            first = fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno
            answer = textwrap.dedent("\n".join(lines[first - 1:fn.end_lineno]))
            if len(answer) > max_answer_chars:
                continue
            signature = textwrap.dedent("\n".join(lines[fn.lineno - 1:fn.body[0].lineno - 1]))
            if not signature.strip():  # docstring on the def line
                continue
            prompt = (f"Write the Python function `{fn.name}` of the standard library module `{module}`.\n"
                      f"Signature:\n{signature}\nDocstring:\n{doc}")
            yield f"{rel}:{fn.lineno}", pair_to_messages(prompt, f"```python\n{answer}\n```")
