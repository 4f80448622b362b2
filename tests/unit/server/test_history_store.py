"""The dashboard history: free-form step tags, untagged grouping, metrics apart, SQLite that survives a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lossd.server.monitoring.history import History, open_history
from lossd.server.monitoring.history_store import HISTORY_FILE
from lossd.server.monitoring.tags import MAX_EXTRA_TAGS, extra_tag_errors, progress_of


def _record(history: History, now: float, step: int | None, loss: tuple[float, float]) -> None:
    extra = {} if step is None else {"step": str(step), "checkpoint": f"c{step}"}
    ones = (np.array([1.0, 1.0]), np.array([0.2, 0.9]), np.array([0.0, 1.0]))
    history.record(("m", "d", "s"), losses={"cross_entropy": loss, "accuracy": (1.0, 2.0)}, calibration=ones, rows=2, extra=extra, now=now)


def test_steps_current_and_metric_split() -> None:
    history = History(seconds=60, interval=10, bins=2, clock=lambda: 1025.0)
    _record(history, 1000.0, 100, (2.0, 1.0))
    _record(history, 1002.0, 200, (4.0, 1.0))  # same interval, another step
    _record(history, 1021.0, 200, (6.0, 1.0))
    (series,) = history.snapshot()["series"]
    assert series["losses"] == ["cross_entropy"] and series["metrics"] == ["accuracy"]
    assert series["progress"]["axis"] == "step"
    assert [(p["x"], p["loss"]["cross_entropy"]) for p in series["progress"]["points"]] == [(100, 2.0), (200, 5.0)]
    assert [(p["t"], p["loss"]["cross_entropy"]) for p in series["points"]] == [(1000.0, 3.0), (1020.0, 6.0)]
    assert series["current"]["loss"]["cross_entropy"] == 6.0  # the last interval
    assert series["summary"]["loss"]["cross_entropy"] == 4.0  # the window
    assert series["tags"] == {"step": "200", "checkpoint": "c200"}


def test_untagged_traffic_is_grouped_by_functions() -> None:
    history = History(seconds=60, interval=10, bins=2, clock=lambda: 0.0)
    history.record(("", "", ""), losses={"mse": (1.0, 1.0)}, now=0.0)
    history.record(("", "", ""), losses={"cross_entropy": (1.0, 1.0)}, now=0.0)
    history.record(("", "", ""), losses={"mse": (3.0, 1.0)}, now=0.0)
    groups = {s["group"]: s["summary"]["loss"] for s in history.snapshot()["series"]}
    assert groups == {"mse": {"mse": 2.0}, "cross_entropy": {"cross_entropy": 1.0}}


def test_sqlite_history_survives_a_restart_and_prunes(tmp_path: Path) -> None:
    clock = [1000.0]
    first = open_history(seconds=30, interval=10, bins=2, max_series=10, data_dir=tmp_path, clock=lambda: clock[0])
    _record(first, 1000.0, 1, (2.0, 1.0))
    _record(first, 1001.0, 1, (4.0, 1.0))
    _record(first, 1015.0, 2, (1.0, 1.0))
    before = first.snapshot()
    first.close()
    assert (tmp_path / HISTORY_FILE).exists()
    second = open_history(seconds=30, interval=10, bins=2, max_series=10, data_dir=tmp_path, clock=lambda: clock[0])
    after = second.snapshot()
    assert after["series"] == before["series"]
    # Past the retention the old buckets are neither loaded nor kept on disk.
    clock[0] = 1044.0
    _record(second, 1044.0, 3, (5.0, 1.0))
    second.close()
    third = open_history(seconds=30, interval=10, bins=2, max_series=10, data_dir=tmp_path, clock=lambda: clock[0])
    (series,) = third.snapshot()["series"]
    assert [p["t"] for p in series["points"]] == [1040.0]
    import sqlite3

    with sqlite3.connect(tmp_path / HISTORY_FILE) as db:
        assert db.execute("SELECT min(start) FROM buckets").fetchone()[0] >= 1000.0 + 10
    third.close()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"step": "-3"}, "tags.extra.step: expected a non-negative integer step, got '-3'"),
        ({"epoch": "x"}, "tags.extra.epoch: expected a non-negative number for epoch, got 'x'"),
        ({"model": "m"}, "'model' is a tag of its own"),
        ({"bad key": "v"}, "expected a tag name of letters"),
        ({"note": "v" * 300}, "tags.extra.note: expected a value of at most 256 characters, got 300"),
        ({f"k{i}": "v" for i in range(MAX_EXTRA_TAGS + 1)}, f"expected at most {MAX_EXTRA_TAGS} extra tags, got 17"),
    ],
)
def test_extra_tags_are_bounded_with_errors_naming_the_tag(extra: dict[str, str], match: str) -> None:
    errors = extra_tag_errors(extra)
    assert errors and any(match in f"{field}: {text}" for field, text in errors), errors


def test_progress_of() -> None:
    assert extra_tag_errors({"step": "1200", "epoch": "2.5", "checkpoint": "ckpt"}) == []
    assert progress_of({"step": "1200", "epoch": "2.5"}) == (1200, 2.5)
    assert progress_of({}) == (None, None)
