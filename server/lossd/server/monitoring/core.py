"""Monitoring: the Prometheus registry of one lossd process and the subscriber that feeds it.

One :class:`Monitoring` per process (tests make several: each has its own
``CollectorRegistry``). :meth:`Monitoring.submit` is the servicer's subscriber
(:mod:`lossd.server.monitoring.events`): it queues each event for a background
worker (:mod:`lossd.server.monitoring.worker`), which turns every finished
evaluation into sufficient-statistic counters per model/dataset/split (behind
the series budget of :mod:`lossd.server.monitoring.labels`) and into the
dashboard's in-process :class:`~lossd.server.monitoring.history.History`,
reading the row statistics the evaluation memoized. A stream's messages are
summed and exported once the stream succeeds. It never fails an RPC: an error
while observing is logged and counted, and an event that finds the queue full
is dropped and counted.

Exported families (base units, ``_total`` on counters only; besides these, the
go-grpc-prometheus ``grpc_server_*`` names of :mod:`.interceptor`, the standard
``process_*``, ``python_gc_*`` and ``python_info``, and on CUDA the
``lossd_cuda_*`` gauges of :mod:`.device`):

=========================================  =========================================================
lossd_build_info                           version, python, torch, grpcio
lossd_evaluations_total                    model, dataset, split, method
lossd_evaluated_rows_total                 model, dataset, split (rows = dim 0 of labels/logits)
lossd_evaluated_tokens_total               model, dataset, split (label positions)
lossd_loss_numerator_total                 model, dataset, split, function: Σ numerator of a loss's mean
lossd_loss_denominator_total               model, dataset, split, function: Σ its denominator
lossd_metric_numerator_total               the same for metrics (catalogue families metric, calibration)
lossd_metric_denominator_total             the same for metrics
lossd_calibration_predictions_total        model, dataset, split, bin_upper: top-1 predictions in the bin
lossd_calibration_confidence_total         model, dataset, split, bin_upper: Σ top-1 confidence
lossd_calibration_correct_total            model, dataset, split, bin_upper: Σ [argmax == label]
lossd_last_evaluation_timestamp_seconds    model, dataset, split
lossd_phase_duration_seconds               method, phase (queue, decode, compute, encode): histogram
lossd_monitoring_folded_total              reason: observations exported under __other__
lossd_monitoring_series_limit              scope (per_family, total): the caps on series
lossd_monitoring_series                    family: series counted against the caps
lossd_monitoring_skipped_total             reason: numerators that could not be exported
lossd_calibration_skipped_total            reason: batches without calibration counters (see calibration.py)
lossd_monitoring_dropped_total             events dropped because the monitoring queue was full
lossd_monitoring_errors_total              observer failures (logged with a traceback)
lossd_http_requests_total                  handler (route template), method, code (the gateway)
lossd_http_request_duration_seconds        handler, method: histogram
lossd_workers, lossd_worker_*              lossd serve --workers N only (:mod:`lossd.server.worker_watch`)
=========================================  =========================================================
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry

from lossd.kernels import Evaluation, select_device
from lossd.server.allocator import init_compute_thread
from lossd.server.monitoring.device import DeviceCollector, DeviceStatsProvider, torch_cuda_stats
from lossd.server.monitoring.events import EvaluationEvent, Subscriber
from lossd.server.monitoring.exporter import Exporter, Pending, TagSeries
from lossd.server.monitoring.families import METHODS, PHASES, Families, LimitsCollector, bin_upper_labels
from lossd.server.monitoring.history import Record, open_history
from lossd.server.monitoring.interceptor import GrpcMetrics, MetricsInterceptor
from lossd.server.monitoring.labels import Admission, LabelGuard, SeriesBudget, function_label
from lossd.server.monitoring.multiprocess import aggregate_registry
from lossd.server.monitoring.statistics import OpenStreams, RowSummary, loss_sums, summarize_batch, summarize_batches
from lossd.server.monitoring.worker import Worker
from lossd.server.settings import Settings

__all__ = ["Monitoring", "function_label"]


log = logging.getLogger("lossd.monitoring")

# The queue of events waiting for the worker: a bound on what monitoring may hold on to.
MAX_PENDING_EVENTS = 1024
MAX_PENDING_BYTES = 1 << 30
# How long a scrape or a history read waits for the worker to catch up with the responses sent before it.
FLUSH_SECONDS = 2.0
# What a supervisor exports from its own registry next to the files' sums: lossd_build_info (an Info is never in a file).
SUPERVISOR_FAMILIES = ("lossd_build",)
# Label sets the dashboard's history keeps (each holds an hour of small per-interval sums).
HISTORY_SERIES = 1000


def _register_device(registry: CollectorRegistry, device: str, stats: DeviceStatsProvider | None) -> None:
    """Device metrics only where a CUDA device computes: absent, not 0, elsewhere."""
    if stats is None and device != "cpu":
        selected = select_device(device)
        stats = torch_cuda_stats(selected) if selected.type == "cuda" else None
    if stats is not None:
        registry.register(DeviceCollector(stats))


def _exposed(registry: CollectorRegistry, budget: SeriesBudget, workers_dir: Path | None) -> CollectorRegistry:
    """What /metrics renders: this registry, or the supervisor's sum of its workers' files.

    With workers, each has its own series budget (the caps hold per worker), and only the caps are shown."""
    limits = {"per_family": budget.max_per_family, "total": budget.max_total}
    if workers_dir is None:
        registry.register(LimitsCollector(limits, budget.series))
        return registry
    return aggregate_registry(workers_dir, registry, SUPERVISOR_FAMILIES, [LimitsCollector(limits, dict)])


def _held_bytes(event: EvaluationEvent) -> int:
    """Bytes of tensors an event keeps alive while it waits in the queue."""
    if event.batch is None:
        return 0
    return sum(t.numel() * t.element_size() for t in event.batch.tensors.values())


class Monitoring(Families):
    """Metrics, history and the series budget of one lossd process."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        max_pending_events: int = MAX_PENDING_EVENTS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        device_stats: DeviceStatsProvider | None = None,
        forward_records: Callable[[Sequence[Record]], None] | None = None,
        workers_dir: Path | None = None,
    ) -> None:
        # lossd serve --workers N (.multiprocess): a worker's history records go to ``forward_records``;
        # the supervisor's /metrics sums the prometheus files of ``workers_dir``.
        # _created series double every counter's series for no use in PromQL; this switch is process-wide.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.settings = settings
        self.bins = settings.calibration_bins
        self.bin_labels = bin_upper_labels(self.bins)
        self.registry = registry if registry is not None else CollectorRegistry()
        super().__init__(self.registry)
        self.grpc = GrpcMetrics(self.registry)
        guard = LabelGuard(max_length=settings.label_max_length, allowlist=settings.label_allowlist)
        budget = SeriesBudget(max_per_family=settings.max_series_per_family, max_total=settings.max_series_total)
        self.admission = Admission(guard, budget, self.bins, on_fold=lambda reason: self.folded.labels(reason).inc())
        self.exposed = _exposed(self.registry, budget, workers_dir)
        _register_device(self.registry, settings.device, device_stats)
        self.history = open_history(
            seconds=settings.history_seconds,
            interval=settings.history_interval_seconds,
            bins=self.bins,
            max_series=HISTORY_SERIES,
            data_dir=settings.data_dir if forward_records is None else None,  # the supervisor owns the file
        )
        self._record = self.history.record_many if forward_records is None else forward_records
        self.worker: Worker[EvaluationEvent] = Worker(
            self.observe, max_events=max_pending_events, max_bytes=max_pending_bytes, on_drop=self._dropped
        )
        self.worker.handle_batches(self.observe_many, initializer=init_compute_thread)
        self._streams = OpenStreams(on_forgotten=self.dropped.inc)
        self._exporter = Exporter(self, self.admission, self.bin_labels)

    def interceptor(self) -> MetricsInterceptor:
        """Return the grpc.aio server interceptor exporting the ``grpc_server_*`` families."""
        return MetricsInterceptor(self.grpc)

    def server_hooks(self) -> dict[str, Any]:
        """The keyword arguments that attach this monitoring to ``create_server``."""
        subscribers: list[Subscriber] = [self.submit]
        return {"subscribers": subscribers, "interceptors": [self.interceptor()], "holding": self.held_bytes}

    def held_bytes(self) -> int:
        """Bytes of request tensors the events queued or being observed hold (the server's idle trim waits for 0)."""
        return self.worker.pending[1]

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
        return await asyncio.to_thread(prometheus_client.generate_latest, self.exposed)

    def _dropped(self, event: EvaluationEvent) -> None:
        self.dropped.inc()
        if event.is_stream_message:  # the stream cannot be counted whole: its rows and calibration are skipped
            self._streams.lost_message(event.call)

    def observe(self, event: EvaluationEvent) -> None:
        """Count one event now (tests may call this; the worker calls :meth:`observe_many`); never raises."""
        self.observe_many([event])

    def observe_many(self, events: Sequence[EvaluationEvent]) -> None:
        """Count events now, in order, as one :meth:`observe` each would (see :mod:`.exporter`); never raises."""
        pending, records = BinnedPending(), []
        for event, summary in zip(events, _summaries(events, self.bins), strict=True):
            try:
                record = self._observe(event, pending, summary)
                if record is not None:
                    records.append(record)
            except Exception:
                self.errors.inc()
                log.exception("monitoring failed to observe a %s evaluation", event.method)
        try:
            pending.apply()
            self._record(records)
        except Exception:
            self.errors.inc()
            log.exception("monitoring failed to export %d evaluations", len(events))

    def _observe(self, event: EvaluationEvent, pending: BinnedPending, summary: RowSummary | None = None) -> Record | None:
        if event.aborted:
            self._streams.finish(event.call)  # a failed stream exports nothing
            return None
        if event.evaluation is None:  # a stream message: summed until the stream succeeds
            if event.batch is not None:
                self._streams.add(event.call, summary if summary is not None else summarize_batch(event.batch, event.prepared, self.bins))
            return None
        x = self._exporter
        if event.method in METHODS:
            for phase, seconds in event.phases.items():
                if phase in PHASES:
                    x.child(self.phases, event.method, phase).observe(seconds)
        series = x.tag_series(event.tags.model, event.tags.dataset, event.tags.split)
        x.fold(pending, series.folds)
        pending.add(x.evaluations(series, event.method), 1.0)
        series.last_seen.set(time.time())
        if event.method == "Finalize":
            return None  # merges states computed (and observed) elsewhere: counting them again would double them
        guarded = _export_means(self, series, event.evaluation, event, pending)
        if event.batch is not None:
            summary = summary if summary is not None else summarize_batch(event.batch, event.prepared, self.bins)
        else:
            summary = self._streams.finish(event.call)
        _export_rows(x, pending, series, summary)
        calibration = summary.calibration
        return Record(
            series.key,
            guarded,
            None if calibration is None else (calibration.count, calibration.confidence, calibration.correct),
            summary.rows,
            summary.tokens,
            event.tags.extra,  # free-form tags (step, epoch...): history only, never labels
        )

    def close(self) -> None:
        """Stop the worker (events already queued are still observed), then close the history file."""
        self.worker.close()
        self.worker.flush_sync(FLUSH_SECONDS)
        self.history.close()


def _export_means(
    m: Monitoring, series: TagSeries, evaluation: Evaluation, event: EvaluationEvent, pending: Pending
) -> dict[str, tuple[float, float]]:
    sums = loss_sums(evaluation, event.prior_states)
    x = m._exporter
    for reason in sums.skipped.values():
        pending.add(x.child(m.skipped, reason), 1.0)
    guarded: dict[str, tuple[float, float]] = {}
    for alias, (num, den) in sums.sums.items():
        function = x.function_series(series, alias, evaluation.results[alias].function)
        x.fold(pending, function.folds)
        function.numerator.inc(num)  # fractional amounts: added one evaluation at a time, in order
        function.denominator.inc(den)
        prior = guarded.get(function.label, (0.0, 0.0))
        guarded[function.label] = (prior[0] + num, prior[1] + den)
    return guarded


def _summaries(events: Sequence[EvaluationEvent], bins: int) -> list[RowSummary | None]:
    """The row statistics of every event's batch, computed together (None where it has none to summarize)."""
    wanted = [i for i, e in enumerate(events) if e.batch is not None and not e.aborted and e.method != "Finalize"]
    out: list[RowSummary | None] = [None] * len(events)
    try:
        summaries = summarize_batches([(b, events[i].prepared) for i in wanted if (b := events[i].batch) is not None], bins)
    except Exception:  # each event is summarized alone, and a failure counted against it
        return out
    for i, summary in zip(wanted, summaries, strict=True):
        out[i] = summary
    return out


@dataclass
class BinnedPending(Pending):
    """:class:`Pending`, plus per-bin integer-valued arrays summed per label set before they reach the children.

    Bin counts and Σ correct are integers, which float64 adds exactly in any
    order: summed as arrays, they cost one child increment per bin and label
    set for a whole batch of events, not one per event."""

    bins: dict[int, list[Any]] = field(default_factory=dict)  # id(children) -> [children, amounts]

    def add_bin_array(self, children: Sequence[Any], amounts: np.ndarray) -> None:
        """Count per-bin integer ``amounts`` on ``children`` (one per bin)."""
        slot = self.bins.get(id(children))
        if slot is None:
            self.bins[id(children)] = [children, amounts.copy()]
        else:
            slot[1] += amounts

    def apply(self) -> None:
        """Apply and forget everything pending."""
        for children, amounts in self.bins.values():
            self.add_bins(children, amounts)
        self.bins.clear()
        super().apply()


def _export_rows(x: Exporter, pending: BinnedPending, series: TagSeries, summary: RowSummary) -> None:
    """Add one evaluation's rows, tokens and calibration bins to the per-label-set counters."""
    calibration = summary.calibration
    if calibration is not None:
        pending.add_bin_array(series.predictions, calibration.count)
        pending.add_bin_array(series.correct, calibration.correct)
        for b in calibration.count.nonzero()[0].tolist():  # an empty bin's Σ confidence is 0: adding it changes nothing
            series.confidence[b].inc(float(calibration.confidence[b]))
    for reason, batches in summary.skipped.items():
        pending.add(x.child(x.m.cal_skipped, reason), batches)
    pending.add(series.rows, summary.rows)
    pending.add(series.tokens, summary.tokens)
