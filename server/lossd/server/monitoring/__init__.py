"""Prometheus monitoring of a lossd process: gRPC metrics, sufficient-statistic counters, history.

See :mod:`lossd.server.monitoring.core` for the exported families.
"""

from lossd.server.monitoring.core import Monitoring
from lossd.server.monitoring.interceptor import GrpcMetrics, MetricsInterceptor
from lossd.server.monitoring.labels import OTHER, LabelGuard
from lossd.server.monitoring.statistics import Calibration, LossSums, calibration_counts, loss_sums, row_counts

__all__ = [
    "OTHER",
    "Calibration",
    "GrpcMetrics",
    "LabelGuard",
    "LossSums",
    "MetricsInterceptor",
    "Monitoring",
    "calibration_counts",
    "loss_sums",
    "row_counts",
]
