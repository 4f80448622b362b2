"""What the supervisor of ``lossd serve --workers N`` watches in its workers: health answers, and their metrics.

A worker can be alive and useless: stopped, or with its event loop stuck.
The supervisor asks each serving worker's grpc.health.v1 service over the
worker's private socket every third of ``worker_timeout_seconds``; a worker
that answers none of them for that long is killed, and restarted like any
worker that exits. Any answer counts, NOT_SERVING included: a draining
worker is alive. (Health is answered on the event loop, never behind
compute threads, so a busy worker still answers.)

The supervisor's /metrics adds, next to the sums of the workers' files, what
only it knows (:class:`WorkersCollector`): workers configured and serving,
each worker's restarts, and each live worker's resident memory and CPU time
(read from /proc, so that ``process_*``, which are per process and left out,
have a per-worker stand-in).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["WorkerView", "WorkersCollector", "answers_health", "process_usage"]


@dataclass(frozen=True)
class WorkerView:
    """One worker as /metrics shows it."""

    index: int
    pid: int  # 0 while none is serving
    serving: bool
    restarts: int


async def answers_health(socket_path: Path, timeout: float) -> bool:
    """Whether the worker behind ``socket_path`` answers a health Check within ``timeout`` seconds (whatever its status)."""
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return True


def process_usage(pid: int) -> tuple[int, float] | None:
    """(resident bytes, CPU seconds) of a live process, from /proc; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return pages * os.sysconf("SC_PAGE_SIZE"), (int(stat[11]) + int(stat[12])) / ticks


class WorkersCollector(Collector):
    """``lossd_workers``, ``lossd_worker_restarts_total``, ``lossd_worker_resident_memory_bytes``, ``lossd_worker_cpu_seconds_total``."""

    def __init__(self, workers: Callable[[], Sequence[WorkerView]]) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        """The workers as they are now."""
        views = self.workers()
        count = GaugeMetricFamily("lossd_workers", "Worker processes of lossd serve --workers N, by state.", labels=["state"])
        count.add_metric(["configured"], len(views))
        count.add_metric(["serving"], sum(v.serving for v in views))
        restarts = CounterMetricFamily(
            "lossd_worker_restarts", "Times each worker was restarted after exiting or hanging.", labels=["worker"]
        )
        memory = GaugeMetricFamily("lossd_worker_resident_memory_bytes", "Resident memory of each live worker.", labels=["worker"])
        cpu = CounterMetricFamily("lossd_worker_cpu_seconds", "User and system CPU time of each live worker process.", labels=["worker"])
        for v in views:
            restarts.add_metric([str(v.index)], v.restarts)
            usage = process_usage(v.pid) if v.pid else None
            if usage is not None:
                memory.add_metric([str(v.index)], usage[0])
                cpu.add_metric([str(v.index)], usage[1])
        yield from (count, restarts, memory, cpu)
