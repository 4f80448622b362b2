"""The dashboard history on disk: one SQLite file under ``data_dir``, so a restart keeps it.

A row is one bucket of :class:`~lossd.server.monitoring.history.History`
(series, interval start, step, epoch) with its sums; each record rewrites its
bucket's row (an upsert of totals, so a replayed write cannot double a sum).
Rows older than the retention are deleted as the history moves on. Writes
come from the monitoring worker thread (never the event loop); WAL with
``synchronous=NORMAL`` keeps a commit to a write of the log, without an fsync.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["HISTORY_FILE", "HistoryStore", "StoredBucket"]

HISTORY_FILE = "history.sqlite3"
_NONE = -1.0  # step/epoch not given (both are validated non-negative): NULLs would not collide in a primary key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    model TEXT NOT NULL, dataset TEXT NOT NULL, split TEXT NOT NULL, grp TEXT NOT NULL,
    start REAL NOT NULL, step REAL NOT NULL, epoch REAL NOT NULL,
    sums TEXT NOT NULL,          -- JSON: function label -> [numerator, denominator]
    calibration BLOB NOT NULL,   -- float64 [3, bins]: count, Σ confidence, Σ correct
    bins INTEGER NOT NULL, rows_ INTEGER NOT NULL, tokens INTEGER NOT NULL,
    evaluations INTEGER NOT NULL, last REAL NOT NULL,
    extra TEXT NOT NULL,         -- JSON: the latest free-form tags seen in the bucket
    PRIMARY KEY (model, dataset, split, grp, start, step, epoch)
);
CREATE INDEX IF NOT EXISTS buckets_start ON buckets (start);
"""


@dataclass(frozen=True)
class StoredBucket:
    """One bucket as stored: its key and its sums."""

    series: tuple[str, str, str, str]  # model, dataset, split, group
    start: float
    step: int | None
    epoch: float | None
    sums: dict[str, list[float]]
    calibration: np.ndarray  # [3, bins]
    rows: int
    tokens: int
    evaluations: int
    last: float
    extra: dict[str, str]


class HistoryStore:
    """The SQLite file of one replica's history (thread-safe; one connection, serialized)."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / HISTORY_FILE
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def write(self, bucket: StoredBucket) -> None:
        """Insert or replace one bucket's totals."""
        step = _NONE if bucket.step is None else float(bucket.step)
        epoch = _NONE if bucket.epoch is None else bucket.epoch
        row: tuple[Any, ...] = (
            *bucket.series,
            bucket.start,
            step,
            epoch,
            json.dumps(bucket.sums),
            np.ascontiguousarray(bucket.calibration, dtype=np.float64).tobytes(),
            int(bucket.calibration.shape[1]),
            bucket.rows,
            bucket.tokens,
            bucket.evaluations,
            bucket.last,
            json.dumps(bucket.extra),
        )
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def prune(self, before: float) -> None:
        """Delete the buckets whose interval started before ``before`` (past the retention)."""
        with self._lock:
            self._db.execute("DELETE FROM buckets WHERE start < ?", (before,))

    def load(self, since: float, bins: int) -> list[StoredBucket]:
        """The buckets from ``since`` on with ``bins`` calibration bins, oldest update first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM buckets WHERE start >= ? AND bins = ? ORDER BY last", (since, bins)).fetchall()
        return [_bucket(row) for row in rows]

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


def _bucket(row: tuple[Any, ...]) -> StoredBucket:
    model, dataset, split, grp, start, step, epoch, sums, cal, bins, rows, tokens, evaluations, last, extra = row
    calibration = np.frombuffer(cal, dtype=np.float64).reshape(3, bins).copy()
    return StoredBucket(
        (model, dataset, split, grp),
        start,
        None if step == _NONE else int(step),
        None if epoch == _NONE else float(epoch),
        json.loads(sums),
        calibration,
        rows,
        tokens,
        evaluations,
        last,
        json.loads(extra),
    )
