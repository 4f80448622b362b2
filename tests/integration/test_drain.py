"""Start-up and shutdown of ``lossd serve``: one-line start-up errors, the SIGTERM drain, health under load."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from integration.lossd_process import LOSSD_SERVE, LossdProcess, wait_until

from lossd.client.codec import encode_tensor
from lossd.client.specs import spec_to_proto
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc


def busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def start_failure(env: dict[str, str]) -> tuple[int, str, str]:
    environ = {**os.environ, "LOSSD_DEVICE": "cpu", "LOSSD_GRPC_PORT": "0", "LOSSD_HTTP_PORT": "0", **env}
    result = subprocess.run(LOSSD_SERVE, env=environ, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_a_port_in_use_exits_2_with_one_line_naming_the_setting_and_nothing_announced(which: str) -> None:
    sock, port = busy_port()
    with sock:
        code, out, err = start_failure({f"LOSSD_{which.upper()}_PORT": str(port)})
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"LOSSD_{which.upper()}_PORT" in err and str(port) in err and "Traceback" not in err
    assert "lossd serving" not in out


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LOSSD_LOG_LEVEL", "verbose"), ("LOSSD_GRPC_PORT", "abc"), ("LOSSD_MAX_QUEUED_REQUESTS", "-1"), ("LOSSD_DRAIN_SECONDS", "soon")],
)
def test_a_bad_setting_exits_2_with_one_line_naming_it(variable: str, value: str) -> None:
    code, out, err = start_failure({variable: value})
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert variable in err and "Traceback" not in err and "lossd serving" not in out


def test_an_unreadable_file_exits_2_with_one_line(tmp_path: Path) -> None:
    code, out, err = start_failure({"LOSSD_AUTH_TOKENS_FILE": str(tmp_path / "missing-tokens")})
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "missing-tokens" in err and "Traceback" not in err and "lossd serving" not in out


def batches(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((32, 5)).astype(np.float32), rng.integers(0, 5, 32)) for _ in range(count)]


def message(logits: np.ndarray, labels: np.ndarray, first: bool) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(
        tensors={"logits": encode_tensor(logits), "labels": encode_tensor(labels)},
        functions=[spec_to_proto("cross_entropy")] if first else [],
    )


def health_of(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status)


def test_sigterm_during_a_stream_reports_not_serving_at_once_and_the_stream_finishes_within_the_drain() -> None:
    data = batches(6)
    expected = float(
        F.cross_entropy(torch.from_numpy(np.concatenate([b[0] for b in data])), torch.from_numpy(np.concatenate([b[1] for b in data])))
    )
    with LossdProcess(drain_seconds=3, grace_seconds=2) as served:
        channel = grpc.insecure_channel(served.grpc_address)
        messages: queue.Queue[pb.EvaluateRequest | None] = queue.Queue()
        for i, (logits, labels) in enumerate(data[:3]):
            messages.put(message(logits, labels, i == 0))
        call = pb_grpc.LossServiceStub(channel).EvaluateStream.future(iter(messages.get, None), timeout=30)
        time.sleep(0.5)
        assert health_of(served.grpc_address) == health_pb2.HealthCheckResponse.SERVING
        sigterm = time.monotonic()
        served.terminate()
        wait_until(lambda: health_of(served.grpc_address) == health_pb2.HealthCheckResponse.NOT_SERVING, 1.0, "NOT_SERVING")
        assert httpx.get(f"{served.url}/readyz", timeout=2).status_code == 503
        for logits, labels in data[3:]:  # the stream goes on during the drain
            time.sleep(0.3)
            messages.put(message(logits, labels, False))
        messages.put(None)
        response = call.result(10)
        assert time.monotonic() - sigterm < 3.0  # within the drain
        channel.close()
        code, _, err = served.wait(15)
        stopped = time.monotonic() - sigterm
    assert response.results[0].values["value"] == pytest.approx(expected, rel=1e-6)
    assert response.batches == 6
    assert code == 0 and "Traceback" not in err, err
    assert 3.0 <= stopped < 3.0 + 2.0 + 3.0  # drain, then at most the grace (and process exit)


def test_health_answers_within_a_second_while_heavy_requests_occupy_the_compute_threads() -> None:
    rng = np.random.default_rng(1)
    heavy = pb.EvaluateRequest(  # exact AUROC over 200,000 × 20 scores: a sort of 4 million, per request
        tensors={
            "logits": encode_tensor(rng.standard_normal((200_000, 20)).astype(np.float32)),
            "labels": encode_tensor(rng.integers(0, 20, 200_000)),
        },
        functions=[spec_to_proto("auroc"), spec_to_proto("cross_entropy")],
    )
    with LossdProcess(compute_threads=1) as served:
        stop = threading.Event()
        done: list[float] = []

        def load() -> None:
            with grpc.insecure_channel(served.grpc_address) as channel:
                stub = pb_grpc.LossServiceStub(channel)
                while not stop.is_set():
                    t0 = time.perf_counter()
                    stub.Evaluate(heavy, timeout=60)
                    done.append(time.perf_counter() - t0)

        workers = [threading.Thread(target=load) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            wait_until(lambda: len(done) >= 1, 60, "a heavy request to finish")
            worst = 0.0
            with grpc.insecure_channel(served.grpc_address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for _ in range(20):
                    t0 = time.perf_counter()
                    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
                    worst = max(worst, time.perf_counter() - t0)
                    time.sleep(0.05)
        finally:
            stop.set()
            for w in workers:
                w.join(120)
    print(f"heavy requests took up to {max(done):.2f}s; the slowest health check {worst * 1000:.0f} ms")
    assert max(done) > 0.2, "the load was not heavy"
    assert worst < 1.0, f"a health check took {worst:.2f}s under load"
