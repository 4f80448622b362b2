"""The servicer's Stopwatch: decoding and encoding summed per call, compute the rest of the timed work, time kept on errors."""

from __future__ import annotations

import time

import pytest

from lossd.server.service import Stopwatch


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_phases_add_up_and_compute_excludes_decoding_and_encoding() -> None:
    watch = Stopwatch()

    def work() -> str:
        with watch.decoding():
            spin(0.004)
        spin(0.004)
        with watch.encoding():
            spin(0.002)
        with watch.decoding():  # a stream decodes once per message: the phases sum
            spin(0.002)
        return "done"

    timed = watch.timed(work)
    start = time.perf_counter()
    assert timed() == "done"
    wall = time.perf_counter() - start
    phases = watch.phases()
    assert phases["decode"] >= 0.006 and phases["encode"] >= 0.002
    # compute is the work's time less the decoding and encoding inside it
    assert phases["compute"] >= 0.004
    assert phases["compute"] == pytest.approx(wall - phases["decode"] - phases["encode"], abs=5e-4)
    assert phases["queue"] >= 0
    timing = watch.timing()
    assert timing.decode_seconds == pytest.approx(phases["decode"])
    assert timing.total_seconds >= timing.decode_seconds + 0.006
    assert timing.compute_seconds == pytest.approx(timing.total_seconds - timing.decode_seconds)


def test_a_block_that_raises_still_counts_its_time_and_the_error_propagates() -> None:
    watch = Stopwatch()
    with pytest.raises(ValueError, match="bad tensor"):
        with watch.decoding():
            spin(0.002)
            raise ValueError("bad tensor")
    with pytest.raises(KeyError):
        with watch.encoding():
            raise KeyError("x")
    assert watch.decode_seconds >= 0.002 and watch.encode_seconds >= 0
