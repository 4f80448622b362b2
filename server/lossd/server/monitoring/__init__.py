"""Prometheus monitoring of a lossd process: gRPC metrics, sufficient-statistic counters, history.

The servicer emits :class:`~lossd.server.monitoring.events.EvaluationEvent`;
:class:`Monitoring` subscribes (see :mod:`lossd.server.monitoring.core` for the
exported families).
"""

from lossd.server.monitoring.calibration import SKIP_REASONS, Calibration, calibration_counts
from lossd.server.monitoring.core import Monitoring
from lossd.server.monitoring.device import DeviceCollector, DeviceStats
from lossd.server.monitoring.events import EvaluationEvent, Subscriber
from lossd.server.monitoring.history import History, expected_calibration_error
from lossd.server.monitoring.interceptor import GrpcMetrics, MetricsInterceptor
from lossd.server.monitoring.labels import OTHER, LabelGuard, SeriesBudget
from lossd.server.monitoring.statistics import LossSums, RowSummary, loss_sums, row_counts, summarize_batch

__all__ = [
    "OTHER",
    "SKIP_REASONS",
    "Calibration",
    "DeviceCollector",
    "DeviceStats",
    "EvaluationEvent",
    "GrpcMetrics",
    "History",
    "LabelGuard",
    "LossSums",
    "MetricsInterceptor",
    "Monitoring",
    "RowSummary",
    "SeriesBudget",
    "Subscriber",
    "calibration_counts",
    "expected_calibration_error",
    "loss_sums",
    "row_counts",
    "summarize_batch",
]
