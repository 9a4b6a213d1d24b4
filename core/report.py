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
from memwise.memory import CATEGORIES, DEVICE_CATEGORIES


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
    fig, _ = memory_figure(memory)
    fig.tight_layout()
    fig.savefig(folder / "memory.png", dpi=100)
    plt.close(fig)


def memory_figure(memory: dict[str, Any]) -> tuple[Any, Any]:
    """Bars per category: the baseline's prediction, the plan's (what the plugins saved shows as
    the gap) and the measured step; the title gives each one's total (measured: the step's peak)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2 ** 20
    steps = memory.get("predicted_steps") or []
    bars = [("baseline (predicted)", steps[0] if steps else {}), ("plan (predicted)", memory.get("predicted", {}))]
    measured = memory.get("measured", {})
    if measured:
        bars.append(("measured", measured.get("headline", {})))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(bars)
    xs = range(len(CATEGORIES))
    for i, (label, values) in enumerate(bars):
        ax.bar([x + (i - (len(bars) - 1) / 2) * width for x in xs], [values.get(c, 0) / mib for c in CATEGORIES],
               width, label=label)
    ax.set_xticks(list(xs), [c.replace("_", "\n") for c in CATEGORIES])
    ax.set_ylabel("MiB")
    totals = [f"{label.split(' ')[0]} {sum(values.get(c, 0) for c in DEVICE_CATEGORIES) / mib:.1f}"
              for label, values in bars[:2]]
    if measured:
        totals.append(f"measured peak {measured.get('peak_total', 0) / mib:.1f}")
    ax.set_title("device memory per step (MiB): " + ", ".join(totals), fontsize=9)
    ax.legend()
    return fig, ax
