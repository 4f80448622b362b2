"""Monitoring: the Prometheus registry of one lossd process and the observer that feeds it.

One :class:`Monitoring` per process (tests make several: each has its own
``CollectorRegistry``). ``observe`` is the service's evaluation observer: it
turns every finished evaluation into sufficient-statistic counters per
model/dataset/split (behind the cardinality guard) and into the dashboard's
in-process :class:`~lossd.server.history.History`. It never fails an RPC: an
error while observing is logged and counted.

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
lossd_monitoring_skipped_total            reason: statistics that could not be exported
lossd_monitoring_errors_total             observer failures (logged with a traceback)
lossd_http_requests_total                 handler, method, code (the gateway)
lossd_http_request_duration_seconds       handler, method
========================================  =========================================================
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import prometheus_client
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from lossd.server.history import History, SeriesKey
from lossd.server.monitoring.interceptor import GrpcMetrics, MetricsInterceptor
from lossd.server.monitoring.labels import LabelGuard
from lossd.server.monitoring.statistics import RowSummary, loss_sums, summarize_rows
from lossd.server.service import Observation
from lossd.server.settings import Settings

__all__ = ["Monitoring"]

log = logging.getLogger("lossd.monitoring")

TAGS = ("model", "dataset", "split")
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class Monitoring:
    """Metrics, history and the cardinality guard of one lossd process."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
        # _created series double every counter's series for no use in PromQL; this switch is process-wide.
        prometheus_client.disable_created_metrics()
        self.settings = settings
        self.bins = settings.calibration_bins
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.grpc = GrpcMetrics(r)
        self.guard = LabelGuard(
            max_values=settings.label_max_values,
            max_length=settings.label_max_length,
            allowlist=settings.label_allowlist,
            on_overflow=self._overflowed,
        )
        self.history = History(
            seconds=settings.history_seconds,
            interval=settings.history_interval_seconds,
            bins=self.bins,
            max_series=max(1000, settings.label_max_values),
        )
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
        self.last_seen = Gauge("lossd_last_evaluation_timestamp_seconds", "Unix time of the latest evaluation.", tags, registry=r)
        self.overflow = Counter(
            "lossd_label_overflow", "Label values folded into __other__ by the cardinality guard.", ["label", "reason"], registry=r
        )
        self.skipped = Counter("lossd_monitoring_skipped", "Statistics not exported, by reason.", ["reason"], registry=r)
        self.errors = Counter("lossd_monitoring_errors", "Observations that failed (see the log).", registry=r)
        self.http_requests = Counter("lossd_http_requests", "Gateway HTTP requests.", ["handler", "method", "code"], registry=r)
        self.http_duration = Histogram(
            "lossd_http_request_duration_seconds", "Gateway HTTP latency.", ["handler", "method"], buckets=HTTP_BUCKETS, registry=r
        )
        self._seen: set[SeriesKey] = set()

    def interceptor(self) -> MetricsInterceptor:
        """Return the grpc.aio server interceptor exporting the ``grpc_server_*`` families."""
        return MetricsInterceptor(self.grpc)

    def summarize_rows(self, tensors: Mapping[str, torch.Tensor]) -> RowSummary:
        """One stream batch's per-row sums; the service adds them up and hands the total to :meth:`observe`."""
        return summarize_rows(tensors, self.bins)

    def server_hooks(self) -> dict[str, Any]:
        """The keyword arguments that attach this monitoring to ``create_server``."""
        return {"observers": [self.observe], "interceptors": [self.interceptor()], "batch_summarizer": self.summarize_rows}

    def _overflowed(self, label: str, reason: str) -> None:
        self.overflow.labels(label, reason).inc()

    def labels(self, model: str, dataset: str, split: str) -> SeriesKey:
        """Return the guarded label values of a request's tags."""
        return (self.guard.admit("model", model), self.guard.admit("dataset", dataset), self.guard.admit("split", split))

    def observe(self, obs: Observation) -> None:
        """Count one finished evaluation (the service's observer); never raises."""
        try:
            self._observe(obs)
        except Exception:
            self.errors.inc()
            log.exception("monitoring failed to observe a %s evaluation", obs.method)

    def _observe(self, obs: Observation) -> None:
        key = self.labels(obs.tags.model, obs.tags.dataset, obs.tags.split)
        self._first_sight(key)
        self.evaluations.labels(*key, obs.method).inc()
        self.last_seen.labels(*key).set(time.time())
        if obs.method == "Finalize":
            return  # merges states computed (and observed) elsewhere: counting them again would double them
        sums = loss_sums(obs)
        for reason in sums.skipped.values():
            self.skipped.labels(reason).inc()
        guarded: dict[str, tuple[float, float]] = {}
        for alias, (num, den) in sums.sums.items():
            function = self.guard.admit("function", function_label(alias, obs.evaluation.results[alias].function))
            self.loss_sum.labels(*key, function).inc(num)
            self.loss_count.labels(*key, function).inc(den)
            prior = guarded.get(function, (0.0, 0.0))
            guarded[function] = (prior[0] + num, prior[1] + den)
        # Per-row sums: from the request's tensors, or for a stream from every batch's summary
        # (its observation carries no tensors); nothing is counted for a failed stream.
        summary = (
            obs.row_summary if obs.row_summary is not None else summarize_rows(obs.tensors if obs.method == "Evaluate" else None, self.bins)
        )
        calibration = summary.calibration
        if calibration is not None:
            for b in range(self.bins):
                self.cal_count.labels(*key, str(b)).inc(float(calibration.count[b]))
                self.cal_confidence.labels(*key, str(b)).inc(float(calibration.confidence[b]))
                self.cal_correct.labels(*key, str(b)).inc(float(calibration.correct[b]))
        rows, tokens = summary.rows, summary.tokens
        self.rows.labels(*key).inc(rows)
        self.tokens.labels(*key).inc(tokens)
        self.history.record(
            key,
            losses=guarded,
            calibration=None if calibration is None else (calibration.count, calibration.confidence, calibration.correct),
            rows=rows,
        )

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


def function_label(alias: str, function: str) -> str:
    """The ``function`` label of a result: its catalogue name, plus the alias when they differ.

    ``cross_entropy[ce_smoothed]``: no alias can pass one function's numbers off
    as another's, and differently parameterized results stay apart."""
    return function if alias == function else f"{function}[{alias}]"
