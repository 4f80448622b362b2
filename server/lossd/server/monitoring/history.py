"""The service's own recent history: per-interval sufficient statistics per model/dataset/split.

The dashboard reads this, so loss and calibration drift are visible with no
Prometheus. Like the exported counters it keeps sums only (numerator and
denominator of every mean, per-bin count / confidence / correct), so each
interval's mean loss and ECE, and the reliability diagram over the whole
window, are exact. ECE is the kernels' own ``ece`` (l1 norm, top label)
finalized from those bins, never a formula of its own. Memory is bounded:
``seconds / interval`` buckets per label set, at most ``max_series`` label sets
(the least recently updated goes first).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lossd.kernels import State, finalize_states
from lossd.kernels.evaluate import prepare

__all__ = ["History", "SeriesKey", "expected_calibration_error"]

SeriesKey = tuple[str, str, str]  # (model, dataset, split), after the cardinality guard


def expected_calibration_error(count: np.ndarray, confidence: np.ndarray, correct: np.ndarray) -> float | None:
    """The ``ece`` function's value (l1 norm, top label) on these per-bin sums; None when no row was binned."""
    if float(count.sum()) <= 0:
        return None
    bins = np.stack([count, confidence, correct], axis=-1).astype(np.float64)
    return _finalized_ece(bins.tobytes(), len(count))


@functools.lru_cache(maxsize=1)
def _ece_state_params(n_bins: int) -> tuple[int, str]:
    (spec,) = prepare([{"name": "ece", "params": {"n_bins": n_bins, "norm": "l1", "scope": "top_label"}}])
    return spec.fdef.state_version, spec.state_params


@functools.lru_cache(maxsize=16384)
def _finalized_ece(bins: bytes, n_bins: int) -> float | None:
    # Closed intervals never change: each is finalized once, however often the dashboard polls.
    version, params = _ece_state_params(n_bins)
    fields = {"bins": torch.from_numpy(np.frombuffer(bins, dtype=np.float64).reshape(n_bins, 3).copy())}
    value = finalize_states([("ece", State("ece", version, params, fields))]).results["ece"].value
    return value if math.isfinite(value) else None


@dataclass
class _Bucket:
    start: float
    bins: int
    losses: dict[str, list[float]] = field(default_factory=dict)  # alias -> [numerator, denominator]
    calibration: np.ndarray = field(init=False)  # [3, B]: count, Σ confidence, Σ correct
    rows: int = 0
    evaluations: int = 0
    last: float = 0.0  # time of the latest evaluation in this interval

    def __post_init__(self) -> None:
        self.calibration = np.zeros((3, self.bins), dtype=np.float64)


def _mean(pair: list[float] | None) -> float | None:
    if not pair or pair[1] <= 0:
        return None
    value = pair[0] / pair[1]
    return value if math.isfinite(value) else None


def _json(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


class History:
    """A bounded, thread-safe store of per-interval sums, keyed by :data:`SeriesKey`."""

    def __init__(
        self, *, seconds: float, interval: float, bins: int, max_series: int = 1000, clock: Callable[[], float] = time.time
    ) -> None:
        if interval <= 0 or seconds <= 0:
            raise ValueError(f"expected positive seconds and interval, got {seconds} and {interval}")
        self.seconds = float(seconds)
        self.interval = float(interval)
        self.bins = bins
        self.max_series = max_series
        self._clock = clock
        self._maxlen = max(1, math.ceil(self.seconds / self.interval))
        self._series: OrderedDict[SeriesKey, deque[_Bucket]] = OrderedDict()
        self._lock = threading.Lock()

    def record(
        self,
        key: SeriesKey,
        *,
        losses: Mapping[str, tuple[float, float]],
        calibration: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        rows: int = 0,
        now: float | None = None,
    ) -> None:
        """Add one evaluation's sums to the interval containing ``now``."""
        now = self._clock() if now is None else now
        start = math.floor(now / self.interval) * self.interval
        with self._lock:
            buckets = self._series.get(key)
            if buckets is None:
                buckets = self._series[key] = deque(maxlen=self._maxlen)
                while len(self._series) > self.max_series:
                    self._series.popitem(last=False)
            self._series.move_to_end(key)
            if not buckets or buckets[-1].start < start:
                buckets.append(_Bucket(start, self.bins))
            bucket = buckets[-1]  # a late (clock went back) evaluation joins the newest interval
            for alias, (num, den) in losses.items():
                pair = bucket.losses.setdefault(alias, [0.0, 0.0])
                pair[0] += num
                pair[1] += den
            if calibration is not None:
                bucket.calibration += np.stack(calibration)
            bucket.rows += rows
            bucket.evaluations += 1
            bucket.last = max(bucket.last, now)

    def snapshot(self, *, now: float | None = None) -> dict[str, Any]:
        """Everything the dashboard draws, as JSON-ready data (NaN and empty means as null)."""
        now = self._clock() if now is None else now
        horizon = now - self.seconds
        with self._lock:
            items = [(key, [b for b in buckets if b.start + self.interval > horizon]) for key, buckets in self._series.items()]
            series = [_series_json(key, buckets, self.bins) for key, buckets in items if buckets]
        series.sort(key=lambda s: (s["model"], s["dataset"], s["split"]))
        return {
            "now": now,
            "interval_seconds": self.interval,
            "history_seconds": self.seconds,
            "bins": self.bins,
            "bin_edges": [b / self.bins for b in range(self.bins + 1)],
            "series": series,
        }


def _series_json(key: SeriesKey, buckets: list[_Bucket], bins: int) -> dict[str, Any]:
    functions = sorted({alias for b in buckets for alias in b.losses})
    total = np.zeros((3, bins), dtype=np.float64)
    totals: dict[str, list[float]] = {}
    points = []
    for b in buckets:
        total += b.calibration
        for alias, (num, den) in b.losses.items():
            pair = totals.setdefault(alias, [0.0, 0.0])
            pair[0] += num
            pair[1] += den
        points.append(
            {
                "t": b.start,
                "loss": {alias: _mean(b.losses.get(alias)) for alias in functions},
                "ece": expected_calibration_error(*b.calibration),
                "count": float(b.calibration[0].sum()),
                "rows": b.rows,
                "evaluations": b.evaluations,
            }
        )
    count, confidence, correct = total
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, accuracy = confidence / count, correct / count
    return {
        "model": key[0],
        "dataset": key[1],
        "split": key[2],
        "functions": functions,
        "points": points,
        "reliability": {
            "count": count.tolist(),
            "confidence": [_json(float(x)) for x in mean_conf],
            "accuracy": [_json(float(x)) for x in accuracy],
        },
        "summary": {
            "loss": {alias: _mean(totals[alias]) for alias in functions},
            "ece": expected_calibration_error(count, confidence, correct),
            "count": float(count.sum()),
            "rows": sum(b.rows for b in buckets),
            "evaluations": sum(b.evaluations for b in buckets),
            "last_seen": buckets[-1].last,
        },
    }
