"""Monitoring as a subscriber: calibration from the evaluation's memo, role mappings, [B, T, V], skips, the queue."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from helpers import assert_close
from lossd.kernels import evaluate
from lossd.server.monitoring import EvaluationEvent, Monitoring
from lossd.server.monitoring.worker import Worker
from lossd.server.settings import Settings
from lossd.v1 import lossd_pb2 as pb

BINS = 15


def _event(tensors: dict[str, torch.Tensor], functions: list[Any], call: int = 1) -> EvaluationEvent:
    evaluation = evaluate(tensors, functions)
    return EvaluationEvent("Evaluate", call, pb.Tags(model="m"), evaluation, evaluation.batch, evaluation.prepared)


def _bins(monitoring: Monitoring, name: str) -> np.ndarray:
    values = {}
    for family in monitoring.registry.collect():
        for s in family.samples:
            if s.name == name and s.labels.get("model") == "m":
                values[round(float(s.labels["bin_upper"]) * BINS) - 1] = s.value
    return np.array([values[b] for b in range(BINS)])


def _skipped(monitoring: Monitoring) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value for f in monitoring.registry.collect() for s in f.samples if s.name == "lossd_calibration_skipped_total"
    }


def _reference(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Catalogue bins in float64: bin b covers (b/B, (b+1)/B], 0 in bin 0."""
    idx = np.clip(np.ceil(confidence * BINS).astype(np.int64) - 1, 0, BINS - 1)
    count = np.bincount(idx, minlength=BINS).astype(np.float64)
    return count, np.bincount(idx, confidence, BINS), np.bincount(idx, correct.astype(np.float64), BINS)


def _softmax_top1(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p.max(-1), p.argmax(-1)


def _assert_counters(monitoring: Monitoring, expected: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    count, confidence, correct = expected
    assert_close(_bins(monitoring, "lossd_calibration_predictions_total"), count, rtol=0, atol=0, what="per-bin counts")
    assert_close(_bins(monitoring, "lossd_calibration_confidence_total"), confidence, rtol=1e-6, what="Σ confidence")
    assert_close(_bins(monitoring, "lossd_calibration_correct_total"), correct, rtol=0, atol=0, what="Σ correct")


def test_role_mapped_logits_export_the_float64_reference() -> None:
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(500, 9, generator=g) * 2, torch.randint(0, 9, (500,), generator=g)
    labels[:11] = -100
    monitoring = Monitoring(Settings(device="cpu", calibration_bins=BINS))
    spec = {"name": "cross_entropy", "inputs": {"logits": "student_logits", "labels": "gold"}}
    monitoring.observe(_event({"student_logits": logits, "gold": labels}, [spec]))
    confidence, argmax = _softmax_top1(logits.numpy())
    keep = labels.numpy() != -100
    _assert_counters(monitoring, _reference(confidence[keep], argmax[keep] == labels.numpy()[keep]))
    assert _skipped(monitoring) == {}


def test_token_level_logits_export_per_token_counters_shifted_and_ignored() -> None:
    g = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(3, 11, 50, generator=g) * 3, torch.randint(0, 50, (3, 11), generator=g)
    labels[0, 4:7] = -100
    monitoring = Monitoring(Settings(device="cpu", calibration_bins=BINS))
    monitoring.observe(_event({"lm": logits, "tokens": labels}, [{"name": "perplexity", "inputs": {"logits": "lm", "labels": "tokens"}}]))
    confidence, argmax = _softmax_top1(logits.numpy())
    confidence, argmax, target = confidence[:, :-1], argmax[:, :-1], labels.numpy()[:, 1:]  # shift: t predicts t + 1
    keep = target != -100
    _assert_counters(monitoring, _reference(confidence[keep], argmax[keep] == target[keep]))
    assert _bins(monitoring, "lossd_calibration_predictions_total").sum() == 3 * 10 - 3


def test_binary_logits_export_the_ece_functions_rule() -> None:
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(400, generator=g) * 2, torch.randint(0, 2, (400,), generator=g)
    monitoring = Monitoring(Settings(device="cpu", calibration_bins=BINS))
    monitoring.observe(_event({"logits": z, "targets": t}, ["bce_with_logits", {"name": "ece", "params": {"n_bins": BINS}}]))
    p1 = 1 / (1 + np.exp(-z.numpy().astype(np.float64)))
    predicted = z.numpy() > 0
    _assert_counters(monitoring, _reference(np.where(predicted, p1, 1 - p1), predicted == (t.numpy() == 1)))


@pytest.mark.parametrize(
    ("tensors", "functions", "reason"),
    [
        ({"predictions": torch.zeros(4), "targets": torch.ones(4)}, ["mse"], "no_class_scores"),
        ({"logits": torch.randn(4, 3)}, ["entropy"], "no_labels"),
        (
            {"logits": torch.softmax(torch.randn(4, 3), 1), "labels": torch.tensor([0, 1, 2, 0])},
            [{"name": "cross_entropy", "params": {"input_kind": "probs"}}],
            "probs_input",
        ),
        ({"logits": torch.randn(4, 3), "target_probs": torch.softmax(torch.randn(4, 3), 1)}, ["cross_entropy"], "soft_targets"),
    ],
)
def test_a_request_without_class_scores_is_counted_with_its_reason(
    tensors: dict[str, torch.Tensor], functions: list[Any], reason: str
) -> None:
    monitoring = Monitoring(Settings(device="cpu", calibration_bins=BINS))
    monitoring.observe(_event(tensors, functions))
    monitoring.observe(_event(tensors, functions, call=2))
    assert _skipped(monitoring) == {reason: 2.0}
    assert _bins(monitoring, "lossd_calibration_predictions_total").sum() == 0


def test_monitoring_reads_the_memo_and_never_computes_row_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(4)
    tensors = {"logits": torch.randn(64, 5, generator=g), "labels": torch.randint(0, 5, (64,), generator=g)}
    event = _event(tensors, ["cross_entropy", "accuracy"])
    assert event.batch is not None
    plan = sys.modules[type(event.batch).__module__]
    calls: list[object] = []
    real = plan.row_statistics
    monkeypatch.setattr(plan, "row_statistics", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(type(event.batch), "row_stats", lambda *a, **k: calls.append(a) or pytest.fail("row_stats called"))
    monitoring = Monitoring(Settings(device="cpu", calibration_bins=BINS))
    monitoring.observe(event)
    assert calls == []
    assert _bins(monitoring, "lossd_calibration_predictions_total").sum() == 64


def test_the_queue_runs_off_the_caller_drops_when_full_and_flushes() -> None:
    release, seen, dropped = threading.Event(), [], []

    def handle(item: int) -> None:
        release.wait(10)
        seen.append(item)

    worker: Worker[int] = Worker(handle, max_events=2, max_bytes=100, on_drop=dropped.append)
    assert worker.submit(1, 10) and worker.submit(2, 10)
    assert not worker.submit(3, 10)  # over max_events: dropped at once, the caller never waits
    assert worker.pending == (2, 20) and dropped == [3] and seen == []
    assert not worker.flush_sync(timeout=0.05)
    release.set()
    assert asyncio.run(worker.flush(timeout=10)) and seen == [1, 2] and worker.pending == (0, 0)
    assert worker.submit(4, 60) and not worker.submit(5, 60)  # over max_bytes
    worker.flush_sync(10)
    worker.close()


def test_submitted_events_are_observed_after_flush() -> None:
    monitoring = Monitoring(Settings(device="cpu", calibration_bins=BINS))
    tensors = {"logits": torch.randn(32, 4), "labels": torch.randint(0, 4, (32,))}
    for call in range(5):
        monitoring.submit(_event(tensors, ["cross_entropy"], call=call))
    assert asyncio.run(monitoring.flush(timeout=30))
    assert _bins(monitoring, "lossd_calibration_predictions_total").sum() == 5 * 32
    text = asyncio.run(monitoring.exposition()).decode()
    assert 'lossd_evaluations_total{dataset="",method="Evaluate",model="m",split=""} 5.0' in text
    monitoring.close()


def test_queued_events_are_handled_together_in_order() -> None:
    release, batches = threading.Event(), []

    def handle_batch(items: Any) -> None:
        release.wait(10)
        batches.append(list(items))

    worker: Worker[int] = Worker(lambda item: pytest.fail("handle_batch is set"), max_events=8, max_bytes=100, on_drop=lambda item: None)
    worker.handle_batches(handle_batch)
    for item in range(5):
        assert worker.submit(item, 1)
    release.set()
    assert worker.flush_sync(timeout=10) and worker.pending == (0, 0)
    assert [item for batch in batches for item in batch] == [0, 1, 2, 3, 4] and len(batches) < 5
    worker.close()
    with pytest.raises(RuntimeError, match="after close"):
        worker.submit(5, 1)


def test_observing_events_together_exports_what_one_at_a_time_exports() -> None:
    g = torch.Generator().manual_seed(9)
    events = []
    for call in range(6):
        tensors = {"logits": torch.randn(40, 7, generator=g) * 3, "labels": torch.randint(0, 7, (40,), generator=g)}
        events.append(_event(tensors, ["cross_entropy", "accuracy", "ece"], call=call))
    one, together = Monitoring(Settings(device="cpu", calibration_bins=BINS)), Monitoring(Settings(device="cpu", calibration_bins=BINS))
    for event in events:
        one.observe(event)
    together.observe_many(events)

    def samples(m: Monitoring) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        skip = ("lossd_last_evaluation", "process_", "python_")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in m.registry.collect()
            for s in f.samples
            if not s.name.startswith(skip)
        }

    assert samples(one) == samples(together)  # bit for bit: == on every float
    assert samples(one)[("lossd_evaluations_total", (("dataset", ""), ("method", "Evaluate"), ("model", "m"), ("split", "")))] == 6
    series = one.history.snapshot()["series"], together.history.snapshot()["series"]
    timeless = [{k: v for k, v in s[0]["summary"].items() if k != "last_seen"} for s in series]  # the clock moved on
    assert timeless[0] == timeless[1] and series[0][0]["reliability"] == series[1][0]["reliability"]


def _recording_worker(**kwargs: Any) -> tuple[Worker[int], list[list[int]], threading.Event]:
    batches: list[list[int]] = []
    handled = threading.Event()

    def handle_batch(items: Any) -> None:
        batches.append(list(items))
        handled.set()

    worker: Worker[int] = Worker(
        lambda item: pytest.fail("handle_batch is set"), max_events=64, max_bytes=100, on_drop=lambda item: None, **kwargs
    )
    worker.handle_batches(handle_batch)
    return worker, batches, handled


def test_the_worker_gathers_a_batch_after_each_and_a_flush_cuts_the_gathering_short() -> None:
    worker, batches, handled = _recording_worker(gather_seconds=1.0)
    assert worker.submit(0, 1)
    assert handled.wait(0.6) and batches == [[0]]  # idle: the first event is taken at once
    for item in (1, 2, 3):  # queued while the next batch gathers: they wake nobody
        assert worker.submit(item, 1)
    started = time.monotonic()
    assert worker.flush_sync(timeout=10)
    assert time.monotonic() - started < 0.6, "a flush waited for the gathering to time out"
    assert batches == [[0], [1, 2, 3]] and worker.pending == (0, 0)
    worker.close()


def test_a_full_batch_is_taken_without_waiting_the_gathering_out() -> None:
    worker, batches, handled = _recording_worker(gather_seconds=1.0, max_batch=3)
    assert worker.submit(0, 1) and handled.wait(0.6)
    handled.clear()
    started = time.monotonic()
    for item in range(1, 4):
        assert worker.submit(item, 1)
    assert handled.wait(2.0) and batches == [[0], [1, 2, 3]]
    assert time.monotonic() - started < 0.6, "a full batch waited for the gathering to time out"
    worker.close()
    with pytest.raises(ValueError, match=r"gather_seconds: expected a number of seconds in \[0, 1\], got -1"):
        Worker(lambda item: None, max_events=1, max_bytes=1, on_drop=lambda item: None, gather_seconds=-1)


def test_an_event_holding_large_tensors_is_taken_without_waiting_the_gathering_out() -> None:
    # Its tensors (a client's shared-memory segment, under its lock) are let go sooner; small ones still gather.
    worker, batches, handled = _recording_worker(gather_seconds=1.0, urgent_bytes=50)
    assert worker.submit(0, 1) and handled.wait(0.6)
    handled.clear()
    started = time.monotonic()
    assert worker.submit(1, 1) and worker.submit(2, 50)
    assert handled.wait(2.0) and batches == [[0], [1, 2]]
    assert time.monotonic() - started < 0.6, "an urgent event waited for the gathering to time out"
    handled.clear()
    started = time.monotonic()
    assert worker.submit(3, 1) and handled.wait(2.0) and batches[-1] == [3]
    assert time.monotonic() - started > 0.5, "a small event after an urgent one did not gather"
    worker.close()


def _exported(m: Monitoring) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    skip = ("lossd_last_evaluation", "process_", "python_")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in m.registry.collect() for s in f.samples if not s.name.startswith(skip)
    }


def test_a_mixed_queue_observed_together_exports_what_one_at_a_time_exports() -> None:
    g = torch.Generator().manual_seed(13)
    events = []
    for call in range(30):  # several label sets, sizes, dtypes and function sets, interleaved
        rows, k = (64, 10) if call % 3 else (17, 4)
        logits = torch.randn(rows, k, generator=g) * 3
        tensors = {"logits": logits.double() if call % 5 == 0 else logits, "labels": torch.randint(0, k, (rows,), generator=g)}
        functions: list[Any] = ["cross_entropy"] if call % 2 else ["cross_entropy", "accuracy", {"name": "ece", "params": {"n_bins": 10}}]
        evaluation = evaluate(tensors, functions)
        tags = pb.Tags(model=f"m{call % 4}", dataset="d")
        events.append(
            EvaluationEvent("Evaluate", call, tags, evaluation, evaluation.batch, evaluation.prepared, phases={"compute": 1e-4 * call})
        )
    tokens = {"logits": torch.randn(3, 7, 11, generator=g), "labels": torch.randint(0, 11, (3, 7), generator=g)}
    lm = evaluate(tokens, [{"name": "lm_cross_entropy", "params": {"shift": True}}])
    stream = [EvaluationEvent("EvaluateStream", 99, pb.Tags(model="s"), None, lm.batch, lm.prepared) for _ in range(3)]
    events[5:5] = [*stream, EvaluationEvent("EvaluateStream", 99, pb.Tags(model="s"), lm, None, lm.prepared)]
    one, together = Monitoring(Settings(device="cpu", calibration_bins=BINS)), Monitoring(Settings(device="cpu", calibration_bins=BINS))
    for event in events:
        one.observe(event)
    together.observe_many(events)
    assert _exported(one) == _exported(together)  # bit for bit: == on every float
    assert (
        sum(v for (name, _), v in _exported(one).items() if name == "lossd_calibration_predictions_total") == 20 * 64 + 10 * 17 + 3 * 3 * 6
    )


@pytest.mark.parametrize("batched", [False, True], ids=["one-at-a-time", "batched"])
def test_the_worker_keeps_no_handled_event_alive_while_it_waits(batched: bool) -> None:
    # An event holds its request's tensors (a client's shared-memory segment under its lock among them):
    # once handled, nothing of it may stay referenced by the idle worker until the next event comes.
    import gc
    import weakref

    class Event:
        pass

    worker: Worker[Event] = Worker(lambda item: None, max_events=8, max_bytes=100, on_drop=lambda item: None, gather_seconds=0)
    if batched:
        worker.handle_batches(lambda items: None)
    event = Event()
    alive = weakref.ref(event)
    assert worker.submit(event, 10)
    del event
    assert worker.flush_sync(10)
    gc.disable()  # a reference held by the worker, not a cycle waiting for the collector
    try:
        deadline = time.monotonic() + 5
        while alive() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert alive() is None
    finally:
        gc.enable()
        worker.close()
