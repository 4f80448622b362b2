"""The pieces of monitoring across workers (lossd.server.monitoring.multiprocess) and the supervisor's port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lossd.server.monitoring.families import Families
from lossd.server.monitoring.history import History, Record
from lossd.server.monitoring.multiprocess import FilteredCollector, RecordReceiver, SupervisorLink, aggregate_registry
from lossd.server.supervisor import reserve_port

# A worker's families, counting in files: what one process of `lossd serve --workers N` writes.
WORKER = textwrap.dedent(
    """
    import sys
    from prometheus_client import CollectorRegistry
    from lossd.server.monitoring.families import Families
    from lossd.server.monitoring.interceptor import GrpcMetrics
    r = CollectorRegistry()
    f, g = Families(r), GrpcMetrics(r)
    amount, stamp = float(sys.argv[1]), float(sys.argv[2])
    f.evaluations.labels("m", "d", "s", "Evaluate").inc()
    f.loss_numerator.labels("m", "d", "s", "cross_entropy").inc(amount)
    f.last_seen.labels("m", "d", "s").set(stamp)
    g.in_flight.labels("lossd.v1.LossService", "Evaluate").inc(1)
    f.phases.labels("Evaluate", "compute").observe(0.001)
    """
)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a family appears twice"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_supervisor_sums_its_workers_files_and_combines_gauges_by_meaning(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for amount, stamp in (("1.25", "100"), ("2.5", "300")):
        subprocess.run([sys.executable, "-c", WORKER, amount, stamp], env=env, check=True, timeout=120)
    own = CollectorRegistry()
    Families(own)  # the supervisor's own (in-memory here): only lossd_build_info may come from it
    values = samples(aggregate_registry(tmp_path, own, ("lossd_build",)))
    tags = (("dataset", "d"), ("model", "m"), ("split", "s"))
    assert values["lossd_evaluations_total", (*tags[:1], ("method", "Evaluate"), *tags[1:])] == 2
    assert values["lossd_loss_numerator_total", (tags[0], ("function", "cross_entropy"), *tags[1:])] == 3.75
    assert values["lossd_last_evaluation_timestamp_seconds", tags] == 300  # the latest, not a sum
    # In flight: summed over live workers; both processes exited without being marked dead, so both count.
    assert values["lossd_grpc_in_flight_requests", (("grpc_method", "Evaluate"), ("grpc_service", "lossd.v1.LossService"))] == 2
    assert values["lossd_phase_duration_seconds_count", (("method", "Evaluate"), ("phase", "compute"))] == 2
    assert any(name == "lossd_build_info" for name, _ in values)


def test_filtered_collector_keeps_only_the_named_families() -> None:
    r = CollectorRegistry()
    Counter("lossd_build_things", "x", registry=r).inc()
    Counter("other", "y", registry=r).inc()
    out = CollectorRegistry()
    out.register(FilteredCollector(r, ("lossd_build",)))
    names = {name for name, _ in samples(out)}
    assert "lossd_build_things_total" in names and not any(n.startswith("other") for n in names)


def test_records_reach_the_supervisors_history_and_ready_is_reported(tmp_path: Path) -> None:
    history = History(seconds=3600, interval=10, bins=3)
    ready: list[tuple[int, int]] = []
    receiver = RecordReceiver(tmp_path, b"k" * 32, history, lambda i, pid: ready.append((i, pid)))
    link = SupervisorLink(tmp_path, b"k" * 32)
    try:
        assert link.send(("ready", 3, 1234))
        calibration = (np.array([1.0, 0.0, 2.0]), np.array([0.2, 0.0, 1.8]), np.array([1.0, 0.0, 1.0]))
        link.send_records([Record(("m", "d", "s"), {"cross_entropy": (6.0, 4.0)}, calibration, 4, 0, {"step": "7"})])
        deadline = time.monotonic() + 10
        while (not ready or not history.snapshot()["series"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready == [(3, 1234)]
        (series,) = history.snapshot()["series"]
        assert sum(p["rows"] for p in series["points"]) == 4
    finally:
        link.close()
        receiver.close()


def test_a_worker_link_notices_its_supervisor_gone(tmp_path: Path) -> None:
    receiver = RecordReceiver(tmp_path, b"k" * 32, History(seconds=60, interval=1, bins=2), lambda i, pid: None)
    link = SupervisorLink(tmp_path, b"k" * 32)
    lost: list[bool] = []
    link.watch(lambda: lost.append(True))
    time.sleep(0.2)  # accepted
    receiver.close()
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lost == [True]
    assert not link.send(("records", []))  # and sends nothing more, without raising


def test_a_wrong_key_is_refused(tmp_path: Path) -> None:
    receiver = RecordReceiver(tmp_path, b"k" * 32, History(seconds=60, interval=1, bins=2), lambda i, pid: None)
    try:
        with pytest.raises(Exception, match="digest|authentication"):
            SupervisorLink(tmp_path, b"x" * 32)
    finally:
        receiver.close()


def test_reserve_port_holds_a_free_port_for_reuseport_listeners() -> None:
    held = reserve_port("127.0.0.1", 0)
    try:
        port = held.getsockname()[1]
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind(("127.0.0.1", port))  # what each worker's gRPC server does
            listener.listen()
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # nobody else gets it meanwhile
    finally:
        held.close()


def test_reserve_port_names_the_setting_when_the_port_is_taken() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match=r"grpc_port, LOSSD_GRPC_PORT"):
            reserve_port("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
