"""Recipes: extends, overrides, shipped recipes, and the listing commands."""

from __future__ import annotations

import pytest

from memwise import recipe
from memwise.data.datasets import TextFilesConfig, build_corpus
from memwise.errors import RecipeError


def test_extends_merges_in_order_and_overrides_apply(tmp_path, micro):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: [{micro}]\nname: child\nplugins: [{{use: checkpointing}}]\n")
    rec = recipe.load(str(child), ["plugins.checkpointing.with.layers=[0]", "trainer.max_steps=9"])
    assert rec.config.name == "child" and rec.config.trainer.max_steps == 9
    assert rec.config.model.config["hidden_size"] == 64  # from micro, over base/tiny's 256
    assert rec.plugins[0].config.layers == [0]


def test_extends_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(RecipeError, match="extends itself"):
        recipe.load(str(tmp_path / "a.yaml"))


def test_override_of_an_absent_plugin():
    with pytest.raises(RecipeError, match="no plugin 'coat' in this recipe"):
        recipe.load("quickstart", ["plugins.coat.with.group_size=64"])


def test_every_shipped_recipe_loads_as_yaml():
    names = recipe.shipped()
    assert {"quickstart", "baseline", "base/tiny", "base/small"} <= set(names)
    for name in names:
        assert isinstance(recipe.to_plain(recipe.load_raw(name)), dict)


@pytest.mark.slow
def test_listing_commands(cli):
    code, out, _ = cli("plugins", "list")
    assert code == 0 and "checkpointing" in out and "memwise-checkpointing" in out
    code, out, _ = cli("plugins", "describe", "checkpointing")
    assert code == 0 and "layers" in out and "activation.storage" in out
    code, out, _ = cli("recipes", "list")
    assert code == 0 and "quickstart" in out
    code, out, _ = cli("recipes", "show", "quickstart")
    assert code == 0 and "use: checkpointing" in out


def test_text_files_with_a_local_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "int": 3, "main": 4, "(": 5, ")": 6, "void": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    for i in range(30):
        (tmp_path / f"f{i}.h").write_text("int main ( void )\n")
    from memwise.data.tokens import HFTokenizer

    corpus = build_corpus(TextFilesConfig(builder="text_files", paths=[str(tmp_path / "*.h")], val_percent=20),
                          HFTokenizer(str(tmp_path / "tok")))
    doc = corpus.train[0]
    assert doc.tolist() == [1, 3, 4, 5, 7, 6, 2] and corpus.tokenizer.vocab_size == 8
    with pytest.raises(FileNotFoundError, match="matched no readable"):
        build_corpus(TextFilesConfig(builder="text_files", paths=[str(tmp_path / "*.none")]))


@pytest.mark.slow
def test_discovery_imports_no_kernels():
    """Listing plugins loads every plugin class and must not import triton (DESIGN.md section 1)."""
    import subprocess
    import sys

    code = ("import sys; from memwise import manager\n"
            "names = list(manager.available())\n"
            "[manager.load(n) for n in names]\n"
            "print(len(names), 'triton' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, imported = proc.stdout.split()
    assert int(count) >= 1 and imported == "False"
