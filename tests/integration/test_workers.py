"""``lossd serve --workers N`` as an operator runs it: one port, N processes, one /metrics that adds them up exactly.

Every test starts a real supervisor with real workers (separate processes on
free ports) and talks to it only through its ports and signals, as clients,
Prometheus and an orchestrator do.
"""

from __future__ import annotations

import json
import math
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lossd.client import Client
from tests.integration.lossd_process import LossdProcess, wait_until

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="SO_REUSEPORT workers are a Linux feature")

TAGS = {"model": "m", "dataset": "d", "split": "test"}


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def worker_directory(pid: int) -> Path:
    """The supervisor's private directory, as a worker was started with it."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return Path(next(e.split(b"=", 1)[1] for e in environ if e.startswith(b"LOSSD_WORKER_DIR=")).decode())


def metrics(server: LossdProcess) -> dict[str, float]:
    """Every sample of /metrics by ``name{labels}``; the text must parse, each family once."""
    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=10).read().decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(names) == len(set(names)), "a family appears twice"
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name + json.dumps(dict(sorted(s.labels.items())))] = s.value
    return out


def sample(values: dict[str, float], name: str, **labels: str) -> float:
    return values.get(name + json.dumps(dict(sorted(labels.items()))), 0.0)


def evaluate_on_fresh_channels(address: str, count: int, seed: int = 0) -> float:
    """``count`` evaluations, each on a new channel (a new connection, hashed to some worker); Σ of their CE numerators."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(count):
        batch = {"logits": rng.standard_normal((32, 7), dtype=np.float32), "labels": rng.integers(0, 7, 32)}
        with Client(address) as client:
            result = client.evaluate(batch, ["cross_entropy"], tags=TAGS)
        total += result["cross_entropy"].value * 32
    return total


@pytest.fixture
def two_workers() -> Iterator[LossdProcess]:
    with LossdProcess(workers=2, drain_seconds=0.2, grace_seconds=2) as server:
        wait_until(lambda: len(children(server.pid)) == 2, 30, "two workers")
        yield server


def test_counts_of_every_worker_add_up_exactly_on_one_metrics_endpoint(two_workers: LossdProcess) -> None:
    calls = 24
    numerator = evaluate_on_fresh_channels(two_workers.grpc_address, calls)
    tensors = {
        "logits": {"dtype": "float32", "shape": [2, 2], "data": [[0.0, 1.0], [2.0, 0.5]]},
        "labels": {"dtype": "int64", "shape": [2], "data": [1, 0]},
    }
    body = json.dumps({"tensors": tensors, "functions": ["accuracy"], "tags": TAGS})
    request = urllib.request.Request(f"{two_workers.url}/v1/evaluate", body.encode(), {"Content-Type": "application/json"})
    assert urllib.request.urlopen(request, timeout=30).status == 200  # the gateway forwards to a worker's socket

    def counted() -> bool:
        return sample(metrics(two_workers), "lossd_evaluations_total", method="Evaluate", **TAGS) == calls + 1

    wait_until(counted, 10, "every evaluation counted")
    values = metrics(two_workers)
    assert sample(values, "lossd_evaluated_rows_total", **TAGS) == calls * 32 + 2
    summed = sample(values, "lossd_loss_numerator_total", function="cross_entropy", **TAGS)
    assert math.isclose(summed, numerator, rel_tol=1e-12)
    handled = dict(grpc_code="OK", grpc_method="Evaluate", grpc_service="lossd.v1.LossService", grpc_type="unary")
    assert sample(values, "grpc_server_handled_total", **handled) == calls + 1
    assert sample(values, "lossd_grpc_in_flight_requests", grpc_method="Evaluate", grpc_service="lossd.v1.LossService") == 0
    assert sample(values, "lossd_http_requests_total", handler="/v1/evaluate", method="POST", code="200") == 1
    assert any(k.startswith("lossd_build_info") for k in values)
    # The dashboard's history is the supervisor's, fed by both workers.
    history = json.loads(urllib.request.urlopen(f"{two_workers.url}/v1/history", timeout=10).read())
    (series,) = [s for s in history["series"] if s["model"] == "m" and "cross_entropy" in s["functions"]]
    assert sum(p["rows"] for p in series["points"]) == calls * 32 + 2


def test_a_killed_worker_is_restarted_and_keeps_its_counts(two_workers: LossdProcess) -> None:
    before = evaluate_on_fresh_channels(two_workers.grpc_address, 16)

    def counted(expected: int) -> bool:
        return sample(metrics(two_workers), "lossd_evaluations_total", method="Evaluate", **TAGS) == expected

    # Counted, then killed: what a worker counted is in its files, which outlive it. (A SIGKILL
    # within the monitoring worker's gather window, ~10 ms after a response, loses that response's counts.)
    wait_until(lambda: counted(16), 10, "the first 16 counted")
    victim = children(two_workers.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len([p for p in children(two_workers.pid) if p != victim and alive(p)]) == 2, 30, "a replacement worker")
    after = evaluate_on_fresh_channels(two_workers.grpc_address, 16, seed=1)
    wait_until(lambda: counted(32), 10, "the dead worker's counts and the new one's, none twice")
    summed = sample(metrics(two_workers), "lossd_loss_numerator_total", function="cross_entropy", **TAGS)
    assert math.isclose(summed, before + after, rel_tol=1e-12)


def test_sigterm_drains_every_worker_and_removes_the_private_directory(two_workers: LossdProcess) -> None:
    workers = children(two_workers.pid)
    directory = worker_directory(workers[0])
    assert directory.is_dir() and directory.stat().st_mode & 0o077 == 0  # no one else may read the files or reach the sockets
    two_workers.terminate()
    code, _, err = two_workers.wait(30)
    assert code == 0, err
    assert not any(alive(p) for p in workers)
    assert not directory.exists()


def test_workers_stop_when_their_supervisor_is_killed() -> None:
    with LossdProcess(workers=2) as server:
        wait_until(lambda: len(children(server.pid)) == 2, 30, "two workers")
        workers = children(server.pid)
        os.kill(server.pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in workers), 20, "orphaned workers gone")


def test_a_port_in_use_fails_the_start_naming_the_setting() -> None:
    with LossdProcess() as busy:
        port = busy.grpc_address.rsplit(":", 1)[1]
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="grpc_port"):
            LossdProcess(workers=2, grpc_port=port)
        assert time.monotonic() - start < 60


def test_workers_serve_tls_and_tokens_and_the_gateway_reaches_them(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_certs.py"), "--out", str(tmp_path)], check=True, capture_output=True, timeout=60
    )
    token = "workers-test-token-0123456789"
    (tmp_path / "tokens").write_text(f"workers:{token}\n")
    settings = {
        "tls_cert_file": tmp_path / "server.pem",
        "tls_key_file": tmp_path / "server-key.pem",
        "auth_tokens_file": tmp_path / "tokens",
    }
    with LossdProcess(workers=2, **settings) as server:
        address = f"localhost:{server.grpc_address.rsplit(':', 1)[1]}"
        with Client(address, ca_file=tmp_path / "ca.pem", token=token) as client:
            batch = {"logits": np.zeros((4, 3), np.float32), "labels": np.array([0, 1, 2, 0])}
            assert math.isclose(client.evaluate(batch, ["cross_entropy"])["cross_entropy"].value, math.log(3), rel_tol=1e-6)
        with Client(address, ca_file=tmp_path / "ca.pem") as anonymous, pytest.raises(Exception, match="token"):
            anonymous.evaluate(batch, ["cross_entropy"])
        url = server.url.replace("127.0.0.1", "localhost")
        body = json.dumps({"tensors": {"x": {"dtype": "float32", "shape": [1], "data": [1.0]}}, "functions": ["bogus"]})
        headers = {"content-type": "application/json"}
        ca = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        refused = httpx.post(f"{url}/v1/evaluate", content=body, headers=headers, verify=ca, timeout=30)
        assert refused.status_code == 401  # no token: the gateway refuses before any worker is asked
        unknown = httpx.post(
            f"{url}/v1/evaluate", content=body, headers={**headers, "authorization": f"Bearer {token}"}, verify=ca, timeout=30
        )
        assert unknown.status_code == 400 and "bogus" in unknown.text  # forwarded to a worker, which names the function


def thread_cores(pid: int) -> dict[str, set[str]]:
    """Each thread name of a process -> the CPU lists its threads may run on (Linux /proc)."""
    out: dict[str, set[str]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, status = (task / "comm").read_text().strip(), (task / "status").read_text()
        except OSError:
            continue
        out.setdefault(name, set()).add(next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list")))
    return out


def test_pinned_workers_run_their_event_loop_and_grpc_threads_on_a_core_each() -> None:
    cores = sorted(os.sched_getaffinity(0))
    everything = f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    with LossdProcess(workers=2, pin_event_loop="true") as server:
        wait_until(lambda: len(children(server.pid)) == 2, 30, "two workers")
        rng = np.random.default_rng(0)
        big = {"logits": rng.standard_normal((512, 1024), dtype=np.float32), "labels": rng.integers(0, 1024, 512)}
        for _ in range(4):
            with Client(server.grpc_address) as client:  # over the inline bound: a compute thread runs it
                client.evaluate(big, ["cross_entropy"])
        placed = []
        for pid in children(server.pid):
            threads = thread_cores(pid)
            loop = Path(f"/proc/{pid}/status").read_text().split("Cpus_allowed_list:")[1].split()[0]
            assert loop != everything and threads["grpc_global_tim"] == {loop}, threads
            placed.append(int(loop))
        assert sorted(placed) == sorted(cores[i % len(cores)] for i in range(2))
    # (That compute threads take the whole set back is tests/unit/server/test_affinity.py: Python 3.11 names no OS thread.)


def test_a_worker_that_stops_answering_is_killed_and_restarted() -> None:
    with LossdProcess(workers=2, worker_timeout_seconds=1.5) as server:
        wait_until(lambda: len(children(server.pid)) == 2, 30, "two workers")
        hung = children(server.pid)[0]
        os.kill(hung, signal.SIGSTOP)  # alive, and answering nothing: what a stuck event loop looks like from outside
        wait_until(lambda: not alive(hung), 15, "the hung worker killed")
        wait_until(lambda: len([p for p in children(server.pid) if alive(p)]) == 2, 30, "a replacement")
        wait_until(lambda: sample(metrics(server), "lossd_workers", state="serving") == 2, 30, "both serving again")
        values = metrics(server)
        assert sum(v for k, v in values.items() if k.startswith("lossd_worker_restarts_total")) == 1
        assert sample(values, "lossd_workers", state="configured") == 2
        for worker in ("0", "1"):  # process_* are per process: each live worker's own stand-ins
            assert sample(values, "lossd_worker_resident_memory_bytes", worker=worker) > 50e6
            assert sample(values, "lossd_worker_cpu_seconds_total", worker=worker) > 0
        evaluate_on_fresh_channels(server.grpc_address, 4)


def test_one_process_pins_its_event_loop_too() -> None:
    cores = sorted(os.sched_getaffinity(0))
    with LossdProcess(pin_event_loop="true") as server:
        evaluate_on_fresh_channels(server.grpc_address, 2)
        loop = Path(f"/proc/{server.pid}/status").read_text().split("Cpus_allowed_list:")[1].split()[0]
        assert loop == str(cores[0])
        assert thread_cores(server.pid)["grpc_global_tim"] == {loop}
