"""Summaries of benchmark samples."""

from __future__ import annotations

import statistics


def percentile(samples: list[float], share: float) -> float:
    """The sample below which `share` (0 to 1) of them lie, by nearest rank; NaN when there is none."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def summary(samples: list[float], unit: str = "") -> str:
    """min / median / p95 of `samples`, aligned for a table."""
    p95 = percentile(samples, 0.95)
    return f"min {min(samples):8.2f}{unit}  median {statistics.median(samples):8.2f}{unit}  p95 {p95:8.2f}{unit}"
