"""Monitoring: the Prometheus registry of one lossd process and the subscriber that feeds it.

One :class:`Monitoring` per process (tests make several: each has its own
``CollectorRegistry``). :meth:`Monitoring.submit` is the servicer's subscriber
(:mod:`lossd.server.monitoring.events`): it queues each event for a background
worker (:mod:`lossd.server.monitoring.worker`), which turns every finished
evaluation into sufficient-statistic counters per model/dataset/split (behind
the cardinality guard) and into the dashboard's in-process
:class:`~lossd.server.monitoring.history.History`, reading the row statistics
the evaluation memoized. A stream's messages are summed and exported once the
stream succeeds. It never fails an RPC: an error while observing is logged and
counted, and an event that finds the queue full is dropped and counted.

Exported families (base units, ``_total`` counters, one ``lossd_`` prefix
besides the go-grpc-prometheus ``grpc_server_*`` names):

========================================  =========================================================
lossd_build_info                          version, python, torch, grpcio
lossd_evaluations_total                   model, dataset, split, method
lossd_evaluated_rows_total                model, dataset, split (rows = dim 0 of labels/logits)
lossd_evaluated_tokens_total              model, dataset, split (label positions)
lossd_loss_sum_total                      model, dataset, split, function: Σ numerator of the mean
lossd_loss_count_total                    model, dataset, split, function: Σ denominator
lossd_calibration_count_total             model, dataset, split, bin: rows in the bin
lossd_calibration_confidence_sum_total    model, dataset, split, bin: Σ top-1 confidence
lossd_calibration_correct_sum_total       model, dataset, split, bin: Σ [argmax == label]
lossd_last_evaluation_timestamp_seconds   model, dataset, split
lossd_label_overflow_total                label, reason (cap, too_long, not_allowlisted)
lossd_monitoring_skipped_total            reason: loss sums that could not be exported
lossd_calibration_skipped_total           reason: batches without calibration counters (see calibration.py)
lossd_monitoring_dropped_total            events dropped because the monitoring queue was full
lossd_monitoring_errors_total             observer failures (logged with a traceback)
lossd_http_requests_total                 handler, method, code (the gateway)
lossd_http_request_duration_seconds       handler, method
========================================  =========================================================
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from importlib import metadata
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from lossd.kernels import Evaluation
from lossd.server.monitoring.events import EvaluationEvent, Subscriber
from lossd.server.monitoring.history import History, SeriesKey
from lossd.server.monitoring.interceptor import GrpcMetrics, MetricsInterceptor
from lossd.server.monitoring.labels import LabelGuard
from lossd.server.monitoring.statistics import OpenStreams, RowSummary, loss_sums, summarize_batch
from lossd.server.monitoring.worker import Worker
from lossd.server.settings import Settings

__all__ = ["Monitoring", "function_label"]

log = logging.getLogger("lossd.monitoring")

TAGS = ("model", "dataset", "split")
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The queue of events waiting for the worker: a bound on what monitoring may hold on to.
MAX_PENDING_EVENTS = 1024
MAX_PENDING_BYTES = 1 << 30
# How long a scrape or a history read waits for the worker to catch up with the responses sent before it.
FLUSH_SECONDS = 2.0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class Families:
    """The lossd_* metric families of one registry (see the module docstring)."""

    def __init__(self, r: CollectorRegistry) -> None:
        Info("lossd_build", "Build of this lossd process.", registry=r).info(
            {
                "version": _version("lossd-server"),
                "python": platform.python_version(),
                "torch": _version("torch"),
                "grpcio": _version("grpcio"),
            }
        )
        tags, per_fn, per_bin = list(TAGS), [*TAGS, "function"], [*TAGS, "bin"]
        self.evaluations = Counter("lossd_evaluations", "Evaluations observed, by RPC method.", [*TAGS, "method"], registry=r)
        self.rows = Counter("lossd_evaluated_rows", "Rows (dim 0 of labels, else logits) evaluated.", tags, registry=r)
        self.tokens = Counter("lossd_evaluated_tokens", "Label positions evaluated (B·T for [B, T] labels).", tags, registry=r)
        self.loss_sum = Counter(
            "lossd_loss_sum",
            'Numerator of each function\'s mean (value × denominator; the value itself under reduction="sum").',
            per_fn,
            registry=r,
        )
        self.loss_count = Counter(
            "lossd_loss_count", "Denominator of each function's mean (samples, tokens, weights...).", per_fn, registry=r
        )
        self.cal_count = Counter("lossd_calibration_count", "Rows whose top-1 confidence falls in the bin.", per_bin, registry=r)
        self.cal_confidence = Counter("lossd_calibration_confidence_sum", "Σ top-1 confidence of the rows in the bin.", per_bin, registry=r)
        self.cal_correct = Counter(
            "lossd_calibration_correct_sum", "Correct top-1 predictions among the rows in the bin.", per_bin, registry=r
        )
        self.cal_skipped = Counter(
            "lossd_calibration_skipped",
            "Evaluated batches (an Evaluate, a stream message) that exported no calibration counters, by reason.",
            ["reason"],
            registry=r,
        )
        self.last_seen = Gauge("lossd_last_evaluation_timestamp_seconds", "Unix time of the latest evaluation.", tags, registry=r)
        self.overflow = Counter(
            "lossd_label_overflow", "Label values folded into __other__ by the cardinality guard.", ["label", "reason"], registry=r
        )
        self.skipped = Counter("lossd_monitoring_skipped", "Loss sums not exported, by reason.", ["reason"], registry=r)
        self.errors = Counter("lossd_monitoring_errors", "Observations that failed (see the log).", registry=r)
        self.dropped = Counter("lossd_monitoring_dropped", "Events dropped because the monitoring queue was full.", registry=r)
        self.http_requests = Counter("lossd_http_requests", "Gateway HTTP requests.", ["handler", "method", "code"], registry=r)
        self.http_duration = Histogram(
            "lossd_http_request_duration_seconds", "Gateway HTTP latency.", ["handler", "method"], buckets=HTTP_BUCKETS, registry=r
        )


def _held_bytes(event: EvaluationEvent) -> int:
    """Bytes of tensors an event keeps alive while it waits in the queue."""
    if event.batch is None:
        return 0
    return sum(t.numel() * t.element_size() for t in event.batch.tensors.values())


class Monitoring(Families):
    """Metrics, history and the cardinality guard of one lossd process."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        max_pending_events: int = MAX_PENDING_EVENTS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        # _created series double every counter's series for no use in PromQL; this switch is process-wide.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.settings = settings
        self.bins = settings.calibration_bins
        self.registry = registry if registry is not None else CollectorRegistry()
        super().__init__(self.registry)
        self.grpc = GrpcMetrics(self.registry)
        self.guard = LabelGuard(
            max_values=settings.label_max_values,
            max_length=settings.label_max_length,
            allowlist=settings.label_allowlist,
            on_overflow=lambda label, reason: self.overflow.labels(label, reason).inc(),
        )
        self.history = History(
            seconds=settings.history_seconds,
            interval=settings.history_interval_seconds,
            bins=self.bins,
            max_series=max(1000, settings.label_max_values),
        )
        self.worker: Worker[EvaluationEvent] = Worker(
            self.observe, max_events=max_pending_events, max_bytes=max_pending_bytes, on_drop=self._dropped
        )
        self._streams = OpenStreams(on_forgotten=self.dropped.inc)
        self._seen: set[SeriesKey] = set()

    def interceptor(self) -> MetricsInterceptor:
        """Return the grpc.aio server interceptor exporting the ``grpc_server_*`` families."""
        return MetricsInterceptor(self.grpc)

    def server_hooks(self) -> dict[str, Any]:
        """The keyword arguments that attach this monitoring to ``create_server``."""
        subscribers: list[Subscriber] = [self.submit]
        return {"subscribers": subscribers, "interceptors": [self.interceptor()]}

    def submit(self, event: EvaluationEvent) -> None:
        """The servicer's subscriber: queue the event for the worker (returns at once, never raises)."""
        try:
            self.worker.submit(event, _held_bytes(event), control=event.batch is None)
        except Exception:
            self.errors.inc()
            log.exception("monitoring failed to queue a %s event", event.method)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait (without blocking the loop) until every event submitted so far is observed; False on timeout."""
        done: bool = await self.worker.flush(timeout)
        return done

    async def exposition(self) -> bytes:
        """The Prometheus text of this registry, rendered on a thread once the responses sent so far are counted."""
        await self.flush(FLUSH_SECONDS)
        return await asyncio.to_thread(prometheus_client.generate_latest, self.registry)

    def _dropped(self, event: EvaluationEvent) -> None:
        self.dropped.inc()
        if event.is_stream_message:  # the stream cannot be counted whole: its rows and calibration are skipped
            self._streams.lost_message(event.call)

    def labels(self, model: str, dataset: str, split: str) -> SeriesKey:
        """Return the guarded label values of a request's tags."""
        return (self.guard.admit("model", model), self.guard.admit("dataset", dataset), self.guard.admit("split", split))

    def observe(self, event: EvaluationEvent) -> None:
        """Count one event now (the worker calls this; tests may too); never raises."""
        try:
            self._observe(event)
        except Exception:
            self.errors.inc()
            log.exception("monitoring failed to observe a %s evaluation", event.method)

    def _observe(self, event: EvaluationEvent) -> None:
        if event.aborted:
            self._streams.finish(event.call)  # a failed stream exports nothing
            return
        if event.evaluation is None:  # a stream message: summed until the stream succeeds
            if event.batch is not None:
                self._streams.add(event.call, summarize_batch(event.batch, event.prepared, self.bins))
            return
        key = self.labels(event.tags.model, event.tags.dataset, event.tags.split)
        self._first_sight(key)
        self.evaluations.labels(*key, event.method).inc()
        self.last_seen.labels(*key).set(time.time())
        if event.method == "Finalize":
            return  # merges states computed (and observed) elsewhere: counting them again would double them
        guarded = self._export_losses(key, event.evaluation, event)
        if event.batch is not None:
            summary = summarize_batch(event.batch, event.prepared, self.bins)
        else:
            summary = self._streams.finish(event.call)
        self._export_rows(key, summary)
        calibration = summary.calibration
        self.history.record(
            key,
            losses=guarded,
            calibration=None if calibration is None else (calibration.count, calibration.confidence, calibration.correct),
            rows=summary.rows,
        )

    def _export_losses(self, key: SeriesKey, evaluation: Evaluation, event: EvaluationEvent) -> dict[str, tuple[float, float]]:
        sums = loss_sums(evaluation, event.prior_states)
        for reason in sums.skipped.values():
            self.skipped.labels(reason).inc()
        guarded: dict[str, tuple[float, float]] = {}
        for alias, (num, den) in sums.sums.items():
            function = self.guard.admit("function", function_label(alias, evaluation.results[alias].function))
            self.loss_sum.labels(*key, function).inc(num)
            self.loss_count.labels(*key, function).inc(den)
            prior = guarded.get(function, (0.0, 0.0))
            guarded[function] = (prior[0] + num, prior[1] + den)
        return guarded

    def _export_rows(self, key: SeriesKey, summary: RowSummary) -> None:
        calibration = summary.calibration
        if calibration is not None:
            for b in range(self.bins):
                self.cal_count.labels(*key, str(b)).inc(float(calibration.count[b]))
                self.cal_confidence.labels(*key, str(b)).inc(float(calibration.confidence[b]))
                self.cal_correct.labels(*key, str(b)).inc(float(calibration.correct[b]))
        for reason, batches in summary.skipped.items():
            self.cal_skipped.labels(reason).inc(batches)
        self.rows.labels(*key).inc(summary.rows)
        self.tokens.labels(*key).inc(summary.tokens)

    def _first_sight(self, key: SeriesKey) -> None:
        """Create every per-label-set series at 0, so sums over bins and replicas never miss one."""
        if key in self._seen:
            return
        self._seen.add(key)
        self.rows.labels(*key)
        self.tokens.labels(*key)
        for b in range(self.bins):
            for family in (self.cal_count, self.cal_confidence, self.cal_correct):
                family.labels(*key, str(b))

    def close(self) -> None:
        """Stop the worker (events already queued are still observed)."""
        self.worker.close()


def function_label(alias: str, function: str) -> str:
    """The ``function`` label of a result: its catalogue name, plus the alias when they differ.

    ``cross_entropy[ce_smoothed]``: no alias can pass one function's numbers off
    as another's, and differently parameterized results stay apart."""
    return function if alias == function else f"{function}[{alias}]"
