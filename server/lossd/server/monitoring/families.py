"""The metric families of one lossd registry, and the series each label combination costs.

Names follow the Prometheus conventions: base units (seconds, bytes, ratios
0–1), ``_total`` on counters only, ``_sum``/``_count``/``_bucket`` only as the
suffixes of histograms. Every mean is exported as its numerator and
denominator (:class:`Families` docstring), so windows and replicas merge
exactly. See :mod:`lossd.server.monitoring.core` for the table of names.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["METHODS", "PHASES", "PHASE_BUCKETS", "TAGS", "Families", "LimitsCollector", "bin_upper_labels", "is_metric_family"]

TAGS = ("model", "dataset", "split")
METHODS = ("Evaluate", "EvaluateStream", "Finalize")
PHASES = ("queue", "decode", "compute", "encode")
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A [64, 10] request decodes in tens of microseconds and computes in well under a
# millisecond; a 256 MB one takes tenths of a second to decode and seconds to tens of
# seconds to compute (more on CPU): 25 µs to 2 min, about 2.5 buckets per decade.
PHASE_BUCKETS = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Catalogue families whose functions are metrics (accuracy, Brier...) rather than losses.
METRIC_FAMILIES = frozenset({"metric", "calibration"})


def is_metric_family(family: str) -> bool:
    """Whether a catalogue family's means are exported as ``lossd_metric_*`` (else ``lossd_loss_*``)."""
    return family in METRIC_FAMILIES


def bin_upper_labels(bins: int) -> tuple[str, ...]:
    """The ``bin_upper`` label of each calibration bin: its upper edge (b + 1) / B with 4 decimals.

    Fixed-point, so values sort as text and never change with the float
    formatting of a client library (B <= 100 keeps them distinct)."""
    return tuple(f"{(b + 1) / bins:.4f}" for b in range(bins))


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class Families:
    """The lossd_* families of one registry, with the process, GC and platform collectors."""

    def __init__(self, r: CollectorRegistry) -> None:
        # The defaults of prometheus_client live on its global registry; a custom one needs its own.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        Info("lossd_build", "Build of this lossd process.", registry=r).info(
            {
                "version": _version("lossd-server"),
                "python": platform.python_version(),
                "torch": _version("torch"),
                "grpcio": _version("grpcio"),
            }
        )
        tags, per_fn, per_bin = list(TAGS), [*TAGS, "function"], [*TAGS, "bin_upper"]
        self.evaluations = Counter("lossd_evaluations", "Evaluations observed, by RPC method.", [*TAGS, "method"], registry=r)
        self.rows = Counter("lossd_evaluated_rows", "Rows (dim 0 of labels, else logits) evaluated.", tags, registry=r)
        self.tokens = Counter("lossd_evaluated_tokens", "Label positions evaluated (B·T for [B, T] labels).", tags, registry=r)
        numerator = 'Numerator of each {}\'s mean (value × denominator; the value itself under reduction="sum").'
        denominator = "Denominator of each {}'s mean (samples, tokens, weights...)."
        self.loss_numerator = Counter("lossd_loss_numerator", numerator.format("loss"), per_fn, registry=r)
        self.loss_denominator = Counter("lossd_loss_denominator", denominator.format("loss"), per_fn, registry=r)
        self.metric_numerator = Counter("lossd_metric_numerator", numerator.format("metric"), per_fn, registry=r)
        self.metric_denominator = Counter("lossd_metric_denominator", denominator.format("metric"), per_fn, registry=r)
        self.cal_predictions = Counter(
            "lossd_calibration_predictions",
            "Top-1 predictions whose confidence falls in the bin (bin_upper = its upper edge).",
            per_bin,
            registry=r,
        )
        self.cal_confidence = Counter(
            "lossd_calibration_confidence", "Σ top-1 confidence of the predictions in the bin.", per_bin, registry=r
        )
        self.cal_correct = Counter("lossd_calibration_correct", "Correct top-1 predictions in the bin.", per_bin, registry=r)
        self.cal_skipped = Counter(
            "lossd_calibration_skipped",
            "Evaluated batches (an Evaluate, a stream message) that exported no calibration counters, by reason.",
            ["reason"],
            registry=r,
        )
        # multiprocess_mode: what /metrics shows when workers count in files (lossd serve --workers N); ignored otherwise.
        self.last_seen = Gauge(
            "lossd_last_evaluation_timestamp_seconds", "Unix time of the latest evaluation.", tags, registry=r, multiprocess_mode="max"
        )
        self.folded = Counter(
            "lossd_monitoring_folded",
            "Observations exported under __other__, by reason (family_cap, total_cap, too_long, not_allowlisted).",
            ["reason"],
            registry=r,
        )
        self.skipped = Counter("lossd_monitoring_skipped", "Numerators not exported, by reason.", ["reason"], registry=r)
        self.errors = Counter("lossd_monitoring_errors", "Observations that failed (see the log).", registry=r)
        self.dropped = Counter("lossd_monitoring_dropped", "Events dropped because the monitoring queue was full.", registry=r)
        self.phases = Histogram(
            "lossd_phase_duration_seconds",
            "Time of each phase of a successful evaluation RPC: queue (waiting for a compute thread), decode, compute, encode.",
            ["method", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter("lossd_http_requests", "Gateway HTTP requests.", ["handler", "method", "code"], registry=r)
        self.http_duration = Histogram(
            "lossd_http_request_duration_seconds", "Gateway HTTP latency.", ["handler", "method"], buckets=HTTP_BUCKETS, registry=r
        )


class LimitsCollector(Collector):
    """``lossd_monitoring_series_limit{scope}`` (the caps) and ``lossd_monitoring_series{family}`` (their use)."""

    def __init__(self, limits: dict[str, int], series: Callable[[], dict[str, int]]) -> None:
        self.limits = limits
        self.series = series

    def collect(self) -> Iterator[Metric]:
        """The caps, and the series each budgeted family counts against them now."""
        limit = GaugeMetricFamily(
            "lossd_monitoring_series_limit", "Caps on series with client-chosen labels (per_family, total).", labels=["scope"]
        )
        for scope, value in self.limits.items():
            limit.add_metric([scope], value)
        used = GaugeMetricFamily(
            "lossd_monitoring_series", "Series counted against the caps, by family (folded __other__ series included).", labels=["family"]
        )
        for family, value in sorted(self.series().items()):
            used.add_metric([family], value)
        yield limit
        yield used
