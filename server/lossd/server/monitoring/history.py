"""The service's own recent history: per-interval sufficient statistics per model/dataset/split.

The dashboard reads this, so loss and calibration drift are visible with no
Prometheus. Like the exported counters it keeps sums only (numerator and
denominator of every mean, per-bin count / confidence / correct), so each
interval's mean loss and ECE, and the reliability diagram over the whole
window, are exact. ECE is the kernels' own ``ece`` (l1 norm, top label)
finalized from those bins, never a formula of its own.

A bucket is (series, interval, step, epoch): evaluations tagged with a
``step`` (else an ``epoch``) free-form tag (:mod:`lossd.server.monitoring.tags`)
are also summed per step, so the dashboard can plot against training progress
as well as time. Untagged traffic (no model, dataset or split) is one series
per set of functions evaluated, not one catch-all.

Memory is bounded: at most ``max_points`` buckets per series, none older than
``seconds``, at most ``max_series`` series (the least recently updated goes
first). With a :class:`~lossd.server.monitoring.history_store.HistoryStore`
every bucket is also written to SQLite (on the monitoring worker's thread, as
``record`` is called) and read back at start, so a restart keeps the window.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lossd.kernels import State, finalize_states, get_function
from lossd.kernels.evaluate import prepare
from lossd.server.monitoring.families import is_metric_family
from lossd.server.monitoring.history_store import HistoryStore, StoredBucket
from lossd.server.monitoring.tags import progress_of

__all__ = ["History", "Record", "SeriesKey", "expected_calibration_error", "open_history"]

log = logging.getLogger("lossd.monitoring")

SeriesKey = tuple[str, str, str]  # (model, dataset, split), after the cardinality guard
_Series = tuple[str, str, str, str]  # (model, dataset, split, group): group names the functions of untagged traffic
_Point = tuple[float, int | None, float | None]  # (interval start, step, epoch)
# Buckets one series keeps, whatever the step rate (several steps may land in one interval).
MAX_POINTS = 2048


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
    bins: int
    losses: dict[str, list[float]] = field(default_factory=dict)  # function label -> [numerator, denominator]
    calibration: np.ndarray = field(init=False)  # [3, B]: count, Σ confidence, Σ correct
    rows: int = 0
    tokens: int = 0
    evaluations: int = 0
    last: float = 0.0  # time of the latest evaluation in this bucket
    extra: dict[str, str] = field(default_factory=dict)  # the latest free-form tags

    def __post_init__(self) -> None:
        self.calibration = np.zeros((3, self.bins), dtype=np.float64)

    def add_sums(
        self,
        losses: Mapping[str, tuple[float, float]],
        calibration: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        rows: int,
        tokens: int,
        now: float,
        extra: dict[str, str],
    ) -> None:
        """Add one evaluation (what :meth:`add` of a bucket holding only it would add, in the same order)."""
        for alias, (num, den) in losses.items():
            pair = self.losses.setdefault(alias, [0.0, 0.0])
            pair[0] += num
            pair[1] += den
        if calibration is not None:
            self.calibration += calibration
        self.rows += rows
        self.tokens += tokens
        self.evaluations += 1
        self.last = max(self.last, now)
        self.extra.update(extra)

    def add(self, other: _Bucket) -> None:
        for alias, (num, den) in other.losses.items():
            pair = self.losses.setdefault(alias, [0.0, 0.0])
            pair[0] += num
            pair[1] += den
        self.calibration += other.calibration
        self.rows += other.rows
        self.tokens += other.tokens
        self.evaluations += other.evaluations
        self.last = max(self.last, other.last)
        self.extra.update(other.extra)


class Record(NamedTuple):
    """One evaluation's sums for :meth:`History.record_many` (the arguments of :meth:`History.record`)."""

    key: SeriesKey
    losses: Mapping[str, tuple[float, float]]
    calibration: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    rows: int = 0
    tokens: int = 0
    extra: Mapping[str, str] | None = None
    now: float | None = None


def _mean(pair: list[float] | None) -> float | None:
    if not pair or pair[1] <= 0:
        return None
    value = pair[0] / pair[1]
    return value if math.isfinite(value) else None


def _json(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


@functools.lru_cache(maxsize=4096)
def is_metric_label(label: str) -> bool:
    """Whether a ``function`` label (``name`` or ``name[alias]``) is a metric (0-1 axis) rather than a loss."""
    try:
        return is_metric_family(get_function(label.split("[", 1)[0]).family)
    except (KeyError, ValueError):
        return False  # __other__ (folded labels): drawn with the losses


def _group(key: SeriesKey, functions: Iterable[str]) -> str:
    """Untagged traffic is grouped by the functions it evaluates; tagged traffic by its tags alone."""
    return "" if any(key) else "+".join(sorted(functions)) or "(no mean)"


class History:
    """A bounded, thread-safe store of per-interval sums, keyed by :data:`SeriesKey` (see the module docstring)."""

    def __init__(
        self,
        *,
        seconds: float,
        interval: float,
        bins: int,
        max_series: int = 1000,
        max_points: int = MAX_POINTS,
        clock: Callable[[], float] = time.time,
        store: HistoryStore | None = None,
    ) -> None:
        if interval <= 0 or seconds <= 0:
            raise ValueError(f"expected positive seconds and interval, got {seconds} and {interval}")
        self.seconds = float(seconds)
        self.interval = float(interval)
        self.bins = bins
        self.max_series = max_series
        self.max_points = max_points
        self._clock = clock
        self._series: OrderedDict[_Series, OrderedDict[_Point, _Bucket]] = OrderedDict()
        self._lock = threading.Lock()
        self._store = store
        self._pruned = 0.0
        if store is not None:
            for stored in store.load(self._clock() - self.seconds, bins):
                self._merge(stored.series, (stored.start, stored.step, stored.epoch), _from_stored(stored, bins))

    def record(
        self,
        key: SeriesKey,
        *,
        losses: Mapping[str, tuple[float, float]],
        calibration: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        rows: int = 0,
        tokens: int = 0,
        extra: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> None:
        """Add one evaluation's sums to the bucket of ``now`` (and of its step/epoch free-form tags)."""
        self.record_many([Record(key, losses, calibration, rows, tokens, extra, now)])

    def record_many(self, records: Iterable[Record]) -> None:
        """:meth:`record` each, in order, under one lock; each bucket touched is written to the store once."""
        touched: dict[tuple[_Series, _Point], tuple[_Bucket, float]] = {}
        with self._lock:
            for r in records:
                now = self._clock() if r.now is None else r.now
                extra = dict(r.extra or {})
                series = (*r.key, _group(r.key, r.losses))
                step, epoch = progress_of(extra)
                point, bucket = self._bucket(series, (math.floor(now / self.interval) * self.interval, step, epoch))
                bucket.add_sums(r.losses, r.calibration, r.rows, r.tokens, now, extra)
                touched[series, point] = (bucket, now)
            if self._store is not None:
                for (series, point), (bucket, now) in touched.items():
                    self._write(series, point, bucket, now)

    def _bucket(self, series: _Series, point: _Point) -> tuple[_Point, _Bucket]:
        """The bucket of ``point`` in ``series`` (made if new: the series is the most recent from now on)."""
        buckets = self._series.get(series)
        if buckets is None:
            buckets = self._series[series] = OrderedDict()
            while len(self._series) > self.max_series:
                self._series.popitem(last=False)
        self._series.move_to_end(series)
        if buckets and point not in buckets and point[0] < next(reversed(buckets))[0]:
            newest = next(reversed(buckets))  # a late (clock went back) evaluation joins the newest interval
            point = (newest[0], point[1], point[2])
        bucket = buckets.get(point)
        if bucket is None:
            bucket = buckets[point] = _Bucket(self.bins)
            while len(buckets) > self.max_points:
                buckets.popitem(last=False)
        return point, bucket

    def _merge(self, series: _Series, point: _Point, part: _Bucket) -> _Bucket:
        bucket = self._bucket(series, point)[1]
        bucket.add(part)
        return bucket

    def _write(self, series: _Series, point: _Point, bucket: _Bucket, now: float) -> None:
        assert self._store is not None
        try:
            self._store.write(
                StoredBucket(
                    series,
                    *point,
                    bucket.losses,
                    bucket.calibration,
                    bucket.rows,
                    bucket.tokens,
                    bucket.evaluations,
                    bucket.last,
                    bucket.extra,
                )
            )
            if now - self._pruned >= self.interval:
                self._pruned = now
                self._store.prune(now - self.seconds - self.interval)
        except Exception:  # a full disk must not stop the in-memory history (nor the counters)
            log.exception("the dashboard history could not be written to %s", self._store.path)

    def snapshot(self, *, now: float | None = None) -> dict[str, Any]:
        """Everything the dashboard draws, as JSON-ready data (NaN and empty means as null)."""
        now = self._clock() if now is None else now
        horizon = now - self.seconds
        with self._lock:
            items = [
                (series, [(p, b) for p, b in buckets.items() if p[0] + self.interval > horizon]) for series, buckets in self._series.items()
            ]
            out = [_series_json(series, buckets, self.bins) for series, buckets in items if buckets]
        out.sort(key=lambda s: (s["model"], s["dataset"], s["split"], s["group"]))
        return {
            "source": "local",
            "now": now,
            "interval_seconds": self.interval,
            "history_seconds": self.seconds,
            "bins": self.bins,
            "bin_edges": [b / self.bins for b in range(self.bins + 1)],
            "series": out,
        }

    def close(self) -> None:
        """Close the SQLite file, if any."""
        if self._store is not None:
            with self._lock:
                self._store.close()


def open_history(
    *, seconds: float, interval: float, bins: int, max_series: int, data_dir: Path | None, clock: Callable[[], float] = time.time
) -> History:
    """The history of ``lossd serve``: in memory, and in ``data_dir``/history.sqlite3 when a data directory is set."""
    store = HistoryStore(data_dir) if data_dir is not None else None
    return History(seconds=seconds, interval=interval, bins=bins, max_series=max_series, clock=clock, store=store)


def _from_stored(stored: StoredBucket, bins: int) -> _Bucket:
    bucket = _Bucket(bins, stored.sums, rows=stored.rows, tokens=stored.tokens, evaluations=stored.evaluations, last=stored.last)
    bucket.calibration = stored.calibration
    bucket.extra = stored.extra
    return bucket


def _values(bucket: _Bucket, functions: list[str]) -> dict[str, Any]:
    return {
        "loss": {alias: _mean(bucket.losses.get(alias)) for alias in functions},
        "ece": expected_calibration_error(*bucket.calibration),
        "count": float(bucket.calibration[0].sum()),
        "rows": bucket.rows,
        "tokens": bucket.tokens,
        "evaluations": bucket.evaluations,
    }


def _summed(buckets: Iterable[tuple[Any, _Bucket]], bins: int) -> dict[Any, _Bucket]:
    """Buckets summed by a key (interval start, step...), in first-seen order."""
    out: dict[Any, _Bucket] = {}
    for key, bucket in buckets:
        out.setdefault(key, _Bucket(bins)).add(bucket)
    return out


def _progress(buckets: list[tuple[_Point, _Bucket]], bins: int, functions: list[str]) -> dict[str, Any]:
    """Points against training progress: by step when the tags carry one, else by epoch, else none."""
    for axis, index in (("step", 1), ("epoch", 2)):
        tagged = [(p[index], b) for p, b in buckets if p[index] is not None]
        if tagged:
            by = _summed(sorted(tagged, key=lambda item: item[0]), bins)
            return {"axis": axis, "points": [{"x": x, **_values(b, functions)} for x, b in by.items()]}
    return {"axis": None, "points": []}


def _series_json(series: _Series, buckets: list[tuple[_Point, _Bucket]], bins: int) -> dict[str, Any]:
    functions = sorted({alias for _, b in buckets for alias in b.losses})
    by_time = _summed(sorted(((p[0], b) for p, b in buckets), key=lambda item: item[0]), bins)
    total = _summed((("all", b) for _, b in buckets), bins)["all"]
    points = [{"t": t, **_values(b, functions)} for t, b in by_time.items()]
    latest = max(buckets, key=lambda item: item[1].last)
    count, confidence, correct = total.calibration
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, accuracy = confidence / count, correct / count
    summary = _values(total, functions)
    summary["last_seen"] = total.last
    return {
        "model": series[0],
        "dataset": series[1],
        "split": series[2],
        "group": series[3],
        "functions": functions,
        "losses": [f for f in functions if not is_metric_label(f)],
        "metrics": [f for f in functions if is_metric_label(f)],
        "language_model": total.tokens > total.rows,  # [B, T] labels: calibration counted per token
        "tags": latest[1].extra,
        "points": points,
        "current": points[-1],  # the last interval: what "now" means on the dashboard
        "progress": _progress(buckets, bins, functions),
        "reliability": {
            "count": count.tolist(),
            "confidence": [_json(float(x)) for x in mean_conf],
            "accuracy": [_json(float(x)) for x in accuracy],
        },
        "summary": summary,  # the whole window
    }
