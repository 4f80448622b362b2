"""Shared benchmark helpers: medians of repeated timings, printed as a table with ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs (machines here are noisy)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(title: str, rows: list[tuple[str, float, float | None]], baseline: float) -> None:
    """Print (name, seconds, bytes or None) rows with their ratio to ``baseline`` seconds."""
    print(f"\n{title}")
    print(f"{'case':<48} {'median ms':>10} {'x torch':>8} {'GB/s':>7}")
    for name, seconds, nbytes in rows:
        gbps = f"{nbytes / seconds / 1e9:7.2f}" if nbytes else "       "
        print(f"{name:<48} {seconds * 1e3:10.2f} {seconds / baseline:8.2f} {gbps}")
