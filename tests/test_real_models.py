"""Pretrained models loaded unchanged, the recipe's one tokenizer, HF datasets data, chat SFT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memwise import recipe
from memwise.data.tokens import IGNORE_INDEX, ByteTokenizer
from memwise.errors import RecipeError
from memwise.runner import Run
from memwise.testing import require_real_gguf, require_real_model, tiny_llama


def save_tiny(folder, layers=2, vocab=260):
    tiny_llama(layers=layers, vocab=vocab).save_pretrained(folder)
    return folder


def problems_of(path, overrides, stage="fit"):
    with pytest.raises(RecipeError) as info:
        recipe.load(path, overrides, stage=stage)
    return {p.key: p.message for p in info.value.problems}


# --- loading a model must not change it ---------------------------------------------------


@pytest.mark.slow
def test_pretraining_config_does_not_reach_a_loaded_model(micro, tmp_path):
    folder = save_tiny(tmp_path / "m", layers=3)
    found = problems_of(micro, [f"model.path={folder}"])
    assert "model.config.num_hidden_layers" in found and "model.config.hidden_size" in found
    assert "model.config={}" in found["model.config.num_hidden_layers"]
    # the documented way out: clear the inherited section; runtime fields stay allowed
    rec = recipe.load(micro, [f"model.path={folder}", "model.config={}", "model.config.use_cache=false"])
    run = Run(rec, "fit")
    run.build()
    assert run.ctx.model.config.num_hidden_layers == 3 and len(run.ctx.model.model.layers) == 3
    assert run.ctx.model.config.use_cache is False


def test_override_config_is_an_explicit_opt_in_and_saves_a_consistent_config(micro, tmp_path):
    folder = save_tiny(tmp_path / "m", layers=3)
    rec = recipe.load(micro, [f"model.path={folder}", "model.config={num_hidden_layers: 2}",
                              "model.override_config=true"])
    run = Run(rec, "fit")
    run.build()
    model = run.ctx.model
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    model.save_pretrained(tmp_path / "saved")  # what report.save_model writes
    again = Run(recipe.load(micro, [f"model.path={tmp_path / 'saved'}", "model.config={}"]), "fit")
    again.build()
    for name, value in again.ctx.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_gguf_file_needs_a_folder_and_an_existing_file(micro, tmp_path):
    found = problems_of(micro, ["model.gguf_file=model.gguf", "model.config={}"])
    assert "model.gguf_file" in found and "model.path" in found["model.gguf_file"]
    (tmp_path / "other.gguf").write_bytes(b"")
    found = problems_of(micro, [f"model.path={tmp_path}", "model.gguf_file=model.gguf", "model.config={}"])
    assert "no file 'model.gguf'" in found["model.gguf_file"] and "other.gguf" in found["model.gguf_file"]


@pytest.mark.slow
def test_real_model_logits_equal_transformers_from_pretrained():
    from transformers import AutoModelForCausalLM

    folder = require_real_model()
    run = Run(recipe.load("finetune/smollm2-sft", [f"model.path={folder}"], stage="generate"), "generate")
    run.build()
    assert run.ctx.corpus is None  # generate never tokenizes a corpus to get its tokenizer
    ours = run.ctx.model.eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    assert len(ours.model.layers) == 30 and ours.config.to_dict() == theirs.config.to_dict()
    ids = torch.tensor([run.ctx.tokenizer.encode("def fibonacci(n):\n    return").tolist()])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert run.ctx.tokenizer.vocab_size == 49152 and run.ctx.tokenizer.has_chat_template


@pytest.mark.slow
def test_gguf_file_loads_as_the_same_model_and_saves_as_safetensors(tmp_path):
    folder, name = require_real_gguf()
    run = Run(recipe.load("finetune/smollm2-sft", [f"model.path={folder}", f"model.gguf_file={name}"],
                          stage="generate"), "generate")
    run.build()
    model = run.ctx.model.eval()
    assert run.ctx.tokenizer.has_chat_template and run.ctx.tokenizer.vocab_size == 49152
    reference = Run(recipe.load("finetune/smollm2-sft", [f"model.path={require_real_model()}"], stage="generate"),
                    "generate")
    reference.build()
    ids = torch.tensor([run.ctx.tokenizer.encode("import os\n").tolist()])
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, reference.ctx.model.eval()(ids).logits)
    model.save_pretrained(tmp_path / "saved")  # report.save_model: a plain float folder
    again = Run(recipe.load("finetune/smollm2-sft", [f"model.path={tmp_path / 'saved'}",
                                                     f"tokenizer.path={require_real_model()}"], stage="generate"),
                "generate")
    again.build()
    with torch.no_grad():
        assert torch.equal(again.ctx.model.eval()(ids).logits, logits)


# --- the tokenizer -------------------------------------------------------------------------


def test_tokenizer_defaults_to_the_model_folders_own(tmp_path):
    folder = require_real_model()
    rec = recipe.load("finetune/smollm2-sft", [f"model.path={folder}"], stage="generate")
    assert rec.config.tokenizer.kind == "auto"
    found = problems_of("finetune/smollm2-sft", [f"model.path={folder}", "tokenizer.kind=bytes"])
    assert "byte ids 0-259 would mean other tokens" in found["tokenizer.kind"]


def test_byte_tokens_for_models_built_from_a_config_and_saved_without_a_tokenizer(micro, tmp_path):
    rec = recipe.load(micro, [])
    run = Run(rec, "generate")
    run.build()
    assert isinstance(run.ctx.tokenizer, ByteTokenizer) and run.ctx.model.config.vocab_size == 260
    folder = save_tiny(tmp_path / "m")  # no tokenizer files: a byte-token model
    run = Run(recipe.load(micro, [f"model.path={folder}", "model.config={}"]), "generate")
    run.build()
    assert isinstance(run.ctx.tokenizer, ByteTokenizer)


def test_data_tokenizer_key_moved_to_the_recipe(micro):
    found = problems_of(micro, ["data.builder=text_files", "data.paths=[x]", "data.tokenizer=/tok"])
    assert "tokenizer.path" in found["data.tokenizer"]
    found = problems_of(micro, ["tokenizer.path=/no/such/folder"])
    assert "no HF tokenizer files" in found["tokenizer.path"]


def test_ids_outside_the_models_vocabulary_are_refused(micro, tmp_path):
    from memwise.runner import check_vocabulary

    folder = save_tiny(tmp_path / "m", vocab=200)  # smaller than the byte vocabulary
    run = Run(recipe.load(micro, [f"model.path={folder}", "model.config={}"]), "fit")
    with pytest.raises(RecipeError) as info:
        run.build()
    keys = {p.key: p.message for p in info.value.problems}
    assert "260" in keys["tokenizer"] and "200" in keys["tokenizer"]
    assert "outside the model's vocabulary" in keys["data"]
    corpus = run.ctx.corpus
    big = tiny_llama(hidden=32, layers=1, heads=2, kv=1, inter=64, vocab=300)
    assert check_vocabulary(corpus, big, ByteTokenizer()) == []


# --- HF datasets from local files ----------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_corpus(**keys):
    from memwise.data.datasets import HFDataConfig, build_corpus

    return build_corpus(HFDataConfig(**{"builder": "hf", "seq_len": 64, "val_percent": 20.0, **keys}), ByteTokenizer())


@pytest.mark.slow
def test_hf_text_jsonl_parquet_and_saved_folder_give_the_same_documents(tmp_path):
    import datasets

    texts = [f"document number {i} " * (1 + i % 3) for i in range(40)]
    write_jsonl(tmp_path / "d.jsonl", [{"body": t, "other": i} for i, t in enumerate(texts)])
    rows = datasets.Dataset.from_dict({"body": texts})
    rows.to_parquet(str(tmp_path / "d.parquet"))
    rows.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.txt").write_text("\n".join(texts) + "\n")
    a = hf_corpus(format="jsonl", paths=[str(tmp_path / "*.jsonl")], text_column="body")
    b = hf_corpus(format="parquet", paths=[str(tmp_path / "d.parquet")], text_column="body")
    c = hf_corpus(format="disk", paths=[str(tmp_path / "saved")], text_column="body")
    d = hf_corpus(format="text", paths=[str(tmp_path / "d.txt")])
    for other in (b, c, d):
        assert [x.tolist() for x in other.train] == [x.tolist() for x in a.train]
        assert [x.tolist() for x in other.val] == [x.tolist() for x in a.val]
    assert len(a.train) + len(a.val) == 40 and a.val and a.train_targets is None
    first = ByteTokenizer().encode(texts[0]).tolist()
    assert first in [x[1:-1].tolist() for x in (*a.train, *a.val)]
    with pytest.raises(KeyError, match="no column 'txt'.*body, other"):
        hf_corpus(format="jsonl", paths=[str(tmp_path / "d.jsonl")], text_column="txt")
    with pytest.raises(FileNotFoundError, match="matched no file"):
        hf_corpus(format="jsonl", paths=[str(tmp_path / "none*.jsonl")])


@pytest.mark.slow
def test_hf_chat_columns_train_only_on_answers(tmp_path):
    from memwise.data.windows import ConcatChunkDataset, WindowDataset

    rows = [{"q": f"question {i}?", "a": f"answer {i}."} for i in range(30)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": r["q"]},
                                                        {"role": "assistant", "content": r["a"]}]} for r in rows])
    pairs = hf_corpus(format="jsonl", paths=[str(tmp_path / "pairs.jsonl")], prompt_column="q", response_column="a")
    chat = hf_corpus(format="jsonl", paths=[str(tmp_path / "chat.jsonl")], messages_column="messages")
    assert [x.tolist() for x in pairs.train] == [x.tolist() for x in chat.train]
    tok = ByteTokenizer()
    for ids, mask in zip(pairs.train, pairs.train_targets):
        answer = tok.decode(ids[mask])
        assert answer.startswith("answer ") and answer.endswith(".\n") and "question" not in answer
    for ds in (WindowDataset(pairs.train, 64, tok.pad_id, pairs.train_targets),
               ConcatChunkDataset(pairs.train, 64, pairs.train_targets)):
        for i in range(len(ds)):
            item = ds[i]
            kept = item["labels"][item["labels"] != IGNORE_INDEX]
            assert len(kept) and "question" not in tok.decode(kept.tolist())


def test_chat_truncation_end_or_drop(tmp_path):
    long = "x" * 200
    write_jsonl(tmp_path / "c.jsonl", [{"q": "short?", "a": "yes."}, {"q": "long?", "a": long}, {"q": long, "a": "no"}])
    keys = dict(format="jsonl", paths=[str(tmp_path / "c.jsonl")], prompt_column="q", response_column="a",
                val_percent=0.0)
    cut = hf_corpus(truncation="end", **keys)
    assert cut.stats["truncated"] == 2 and cut.stats["dropped_too_long"] == 1 and len(cut.train) == 2
    assert all(len(x) <= 64 for x in cut.train)
    dropped = hf_corpus(truncation="drop", **keys)
    assert dropped.stats["dropped_too_long"] == 2 and len(dropped.train) == 1


# --- the real model's chat template --------------------------------------------------------


def test_chat_rendering_with_the_models_template():
    from memwise.cli import prompt_ids
    from memwise.data.chat import encode_chat, render
    from memwise.data.tokens import HFTokenizer

    tok = HFTokenizer(str(require_real_model()))
    messages = [{"role": "user", "content": "Add two numbers."},
                {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
                {"role": "user", "content": "And three?"},
                {"role": "assistant", "content": "def add3(a, b, c):\n    return a + b + c"}]
    ids, mask = encode_chat(tok, messages)
    assert tok.tok.decode(ids.tolist()) == render(tok, messages)
    # the targets are exactly the two answers with their end-of-turn markers
    spans = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    answers = [tok.tok.decode(ids[a:b].tolist()) for a, b in zip(spans[::2], spans[1::2])]
    assert answers == ["def add(a, b):\n    return a + b<|im_end|>\n",
                       "def add3(a, b, c):\n    return a + b + c<|im_end|>\n"]
    # generate sees exactly the text before the first answer
    first = prompt_ids(tok, "Add two numbers.")
    assert first == ids[:spans[0]].tolist()
    assert tok.tok.decode(first).endswith("<|im_start|>assistant\n")


def test_pystdlib_instruction_set_is_deterministic_and_answers_are_functions():
    import itertools

    from memwise.data.chat import stdlib_instructions

    a = list(itertools.islice(stdlib_instructions(), 50))
    b = list(itertools.islice(stdlib_instructions(), 50))
    assert a == b and len({name for name, _ in a}) == 50
    for _, (user, answer) in a:
        assert user["role"] == "user" and ("Signature:\ndef " in user["content"]
                                           or "Signature:\nasync def " in user["content"])
        assert answer["content"].startswith("```python\n") and "def " in answer["content"]
