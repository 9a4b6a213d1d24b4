"""Write docs/recipes.md from the recipe schema dataclasses (every key, type, default, doc)."""

from __future__ import annotations

import sys
from pathlib import Path

from memwise.data.datasets import DATASETS
from memwise.data.tokens import TokenizerConfig
from memwise.models import ModelConfig
from memwise.optim import OptimizerConfig, SchedulerConfig
from memwise.recipe import GenerateConfig, RecipeConfig, ReportConfig, TrainerConfig
from memwise.schema import describe


def table(title: str, cls: type, skip: tuple = ()) -> list[str]:
    rows = [f"### `{title}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, tp, default, doc in describe(cls):
        if name not in skip:
            rows.append(f"| `{name}` | `{tp}` | `{default}` | {doc} |")
    return rows + [""]


def render() -> str:
    lines = ["# Recipe reference", "",
             "Generated from the schema dataclasses by `python tools/docs/recipes_md.py`. A recipe is a YAML",
             "mapping; `extends:` merges other recipes first (paths relative to the file, or shipped recipe",
             "names). Mappings merge key by key, but a list replaces the inherited list whole: a recipe",
             "that sets `plugins:` drops the plugins of the recipes it extends (repeat them to keep them).",
             "`memwise run RECIPE key.path=value` overrides any key (values are YAML;",
             "`plugins.NAME.with.key=value` addresses a plugin by name). Every unknown key, wrong type and",
             "missing value is reported at once, with its full key path and a suggestion. Names resolve only",
             "through registries; a dotted import path is refused.", "",
             "```yaml", "extends: [base/tiny.yaml]", "name: quickstart",
             "plugins:", "  - use: checkpointing", "    with: {layers: all}", "```", ""]
    lines += table("top level", RecipeConfig, skip=("model", "tokenizer", "data", "trainer", "optimizer",
                                                     "scheduler", "report", "generate"))
    lines += table("model", ModelConfig)
    lines += table("tokenizer", TokenizerConfig)
    for name, (cls, _) in DATASETS.items():
        lines += table(f"data (builder: {name})", cls)
    lines += table("trainer", TrainerConfig)
    lines += table("optimizer", OptimizerConfig)
    lines += table("scheduler", SchedulerConfig)
    lines += table("report", ReportConfig)
    lines += table("generate", GenerateConfig)
    lines += ["### `plugins`", "", "A list of `{use: NAME, with: {...}}`; `memwise plugins describe NAME` lists a",
              "plugin's settings. The plan orders plugins by phase, then before/after, then recipe order.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
    out.write_text(render())
    sys.stdout.write(f"wrote {out}\n")
