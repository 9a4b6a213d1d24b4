"""docs/lightning.md documents exactly the fields of the run context, so it cannot fall behind the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from memwise import RunContext

DOC = Path(__file__).resolve().parents[1] / "docs" / "lightning.md"


def test_run_context_table_matches_the_dataclass():
    section = DOC.read_text().split("## The run context", 1)[1].split("\n## ", 1)[0]
    documented = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    public = {f.name for f in dataclasses.fields(RunContext) if not f.name.startswith("_")}
    assert documented == public, {"undocumented": public - documented, "no such field": documented - public}
