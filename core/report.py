"""The report folder of a run: resolved recipe, metrics, memory, summary, plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from memwise.files import atomic_write
from memwise.guard import finite_or_none
from memwise.memory import CATEGORIES


def write_recipe(folder: Path, resolved: dict) -> None:
    atomic_write(folder / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())


def write_metrics(folder: Path, history: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(folder / "metrics.csv", buf.getvalue().encode())


def write_json(folder: Path, name: str, data: Any) -> None:
    """JSON with NaN and infinities written as null (strict JSON, never a NaN summary)."""
    text = json.dumps(finite_or_none(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write(folder / name, text.encode())


def summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Final train and validation loss, steps, tokens, throughput."""
    train = [r for r in history if "train_loss" in r]
    val = [r for r in history if r.get("val_loss") is not None]
    last = history[-1] if history else {}
    elapsed = float(last.get("elapsed_s", 0.0))
    tail = train[-10:]
    return {
        "steps": int(last.get("step", 0)),
        "tokens": int(last.get("tokens", 0)),
        "final_train_loss": sum(r["train_loss"] for r in tail) / len(tail) if tail else None,
        "first_val_loss": val[0]["val_loss"] if val else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "elapsed_s": elapsed,
        "tokens_per_s": int(last.get("tokens", 0)) / elapsed if elapsed else None,
    }


def plot(folder: Path, history: list[dict[str, Any]], memory: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [r for r in history if "train_loss" in r]
    val = [r for r in history if r.get("val_loss") is not None]
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train", lw=1)
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    plt.close(fig)
    if not memory:
        return
    measured = memory.get("measured", {}).get("headline", {})
    predicted = memory.get("predicted", {})
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(CATEGORIES))
    mib = 2 ** 20
    ax.bar([x - 0.2 for x in xs], [predicted.get(c, 0) / mib for c in CATEGORIES], 0.4, label="predicted")
    ax.bar([x + 0.2 for x in xs], [measured.get(c, 0) / mib for c in CATEGORIES], 0.4, label="measured")
    ax.set_xticks(list(xs), [c.replace("_", "\n") for c in CATEGORIES])
    ax.set_ylabel("MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "memory.png", dpi=100)
    plt.close(fig)
