"""Accelerator metrics: memory allocated and reserved by torch, and utilization, per CUDA device in use.

Registered only when the service computes on a CUDA device: on CPU these
families do not exist (an absent series, not a misleading 0). Values are read
at scrape time from a *stats provider* (a function returning one
:class:`DeviceStats` per device), so that tests can give a fake one. The torch
provider reads ``torch.cuda.memory_allocated`` / ``memory_reserved`` (what the
caching allocator holds, not what other processes use) and the utilization
through NVML (``torch.cuda.utilization``) only when NVML is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["DeviceCollector", "DeviceStats", "DeviceStatsProvider", "torch_cuda_stats"]


@dataclass(frozen=True)
class DeviceStats:
    """One device's readings; ``utilization`` (0–1) is None when it cannot be read."""

    device: str
    allocated_bytes: float
    reserved_bytes: float
    utilization: float | None = None


DeviceStatsProvider = Callable[[], Sequence[DeviceStats]]


def _utilization(device: torch.device) -> float | None:
    try:
        percent = torch.cuda.utilization(device)
    except Exception:  # NVML missing (pynvml is optional) or unsupported on this device
        return None
    return float(percent) / 100.0


def torch_cuda_stats(device: torch.device) -> DeviceStatsProvider:
    """The provider of the CUDA device the service computes on."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cuda = torch.device("cuda", index)

    def read() -> Sequence[DeviceStats]:
        return [
            DeviceStats(str(cuda), float(torch.cuda.memory_allocated(cuda)), float(torch.cuda.memory_reserved(cuda)), _utilization(cuda))
        ]

    return read


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily("lossd_cuda_memory_allocated_bytes", "Device memory allocated to tensors by torch.", labels=["device"]),
        GaugeMetricFamily(
            "lossd_cuda_memory_reserved_bytes", "Device memory held by torch's caching allocator (allocated + cached).", labels=["device"]
        ),
        GaugeMetricFamily("lossd_cuda_utilization_ratio", "Fraction of time a kernel ran on the device (NVML).", labels=["device"]),
    )


class DeviceCollector(Collector):
    """Collects the :func:`_families` from a stats provider at each scrape."""

    def __init__(self, provider: DeviceStatsProvider) -> None:
        self.provider = provider

    def describe(self) -> Iterator[Metric]:
        """The family names, without reading the device (registration checks them for clashes)."""
        yield from _families()

    def collect(self) -> Iterator[Metric]:
        """One sample per device and family; utilization only where it could be read."""
        allocated, reserved, utilization = _families()
        for stats in self.provider():
            allocated.add_metric([stats.device], stats.allocated_bytes)
            reserved.add_metric([stats.device], stats.reserved_bytes)
            if stats.utilization is not None:
                utilization.add_metric([stats.device], stats.utilization)
        yield allocated
        yield reserved
        if utilization.samples:
            yield utilization
