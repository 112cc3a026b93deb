"""Summaries of benchmark samples."""

from __future__ import annotations

import statistics


def summary(samples: list[float], unit: str = "") -> str:
    """min / median / p95 of `samples`, aligned for a table."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"min {ordered[0]:8.2f}{unit}  median {statistics.median(ordered):8.2f}{unit}  p95 {p95:8.2f}{unit}"
