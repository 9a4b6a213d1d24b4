"""Settings measured to keep long-context retrieval, by model size; ``memwise validate`` warns outside them.

Measured with tools/bench/kvprune_retrieval.py (pass key in 1k-4k tokens of prose and code
under the chat template, exact match, greedy): a setting is safe when it stays within 5
points of the full cache (SnapKV at 50% costs 8-10, ThinK at 0.75 everything, StreamingLLM
the needles outside its recent part). Only small models are measured; larger ones are not checked.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SafeRange:
    """Largest ThinK ratio and smallest SnapKV budget that kept retrieval, for models up to ``max_params``."""

    max_params: int
    measured_on: str
    max_think: float
    min_snapkv: float
    streaming: bool  # False: StreamingLLM lost the needle at every budget measured


MEASURED = (SafeRange(500_000_000, "SmolLM2-135M-Instruct", max_think=0.5, min_snapkv=0.7, streaming=False),)


def unsafe_settings(params: int, think_ratio: float, eviction: str, budget: float) -> list[str]:
    """One sentence per setting outside the measured-safe range for a model of ``params`` parameters."""
    safe = next((r for r in MEASURED if params <= r.max_params), None)
    if safe is None:
        return []
    where = (f"for a model of {params / 1e6:.0f}M parameters (measured on {safe.measured_on}, "
             "docs/plugins/kvprune.md)")
    found = []
    if think_ratio > safe.max_think:
        found.append(f"think_ratio {think_ratio} is above {safe.max_think}, the largest that kept retrieval {where}")
    if eviction == "snapkv" and budget < safe.min_snapkv:
        found.append(f"snapkv budget {budget} is below {safe.min_snapkv}, the smallest that kept retrieval {where}")
    if eviction == "streaming" and budget < 1.0 and not safe.streaming:
        found.append(f"streaming eviction (budget {budget}) loses facts outside its recent window {where}; "
                     "use snapkv for retrieval")
    return found
