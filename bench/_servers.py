"""Servers under test, each in its own process: ``lossd serve`` and the peers (FastAPI, KServe).

Each server gets free ports, its output goes to a log file, and ``start_*``
returns once the server answers its health check. The peak resident set of
the server process is read from ``/proc/PID/status`` (Linux only), and can be
reset to the current RSS through ``/proc/PID/clear_refs``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / ".peers"
KSERVE_PYTHON = PEERS / "kserve" / "bin" / "python"


def free_port() -> int:
    """A TCP port nobody listens on right now (bound to 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style line of /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


@dataclass
class ServerProcess:
    """A running server: its process, the address clients use, and its log."""

    name: str
    process: subprocess.Popen[bytes]
    address: str
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The server's process id (py-spy attaches to it)."""
        return self.process.pid

    def rss_bytes(self) -> int:
        """Current resident set size."""
        return status_kib(self.pid, "VmRSS") * 1024

    def peak_bytes(self) -> int:
        """Peak resident set size since start or since the last reset_peak."""
        return status_kib(self.pid, "VmHWM") * 1024

    def reset_peak(self) -> bool:
        """Reset the peak to the current RSS; False where the kernel does not allow it."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _spawn(name: str, argv: list[str], env: dict[str, str], logs: Path) -> tuple[subprocess.Popen[bytes], Path]:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=ROOT)
    return process, log


def _wait(server: ServerProcess, ready: object, timeout: float = 120.0) -> ServerProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}; see {server.log}")
        try:
            if ready():  # type: ignore[operator]
                return server
        except Exception:  # not listening yet
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s; see {server.log}")


def _grpc_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as reply:
        return bool(reply.status == 200)


def start_lossd(logs: Path, *, env: dict[str, str] | None = None, name: str = "lossd") -> ServerProcess:
    """``lossd serve`` (as ``python -m lossd.server serve``) on free ports, CPU, logging warnings only; ready when gRPC health says SERVING."""
    grpc_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "lossd.server", "serve", "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--device", "cpu"]
    process, log = _spawn(name, argv, {"LOSSD_LOG_LEVEL": "warning", **(env or {})}, logs)
    server = ServerProcess(name, process, f"127.0.0.1:{grpc_port}", log, {"http": f"127.0.0.1:{http_port}"})
    return _wait(server, lambda: _grpc_serving(server.address))


def start_fastapi(logs: Path) -> ServerProcess:
    """The hand-written FastAPI raw-bytes endpoint (bench/peers/fastapi_peer.py) under uvicorn."""
    port = free_port()
    argv = [sys.executable, str(BENCH / "peers" / "fastapi_peer.py"), "--port", str(port)]
    process, log = _spawn("fastapi", argv, {}, logs)
    server = ServerProcess("fastapi", process, f"127.0.0.1:{port}", log)
    return _wait(server, lambda: _http_ok(f"http://{server.address}/health"))


def kserve_available() -> bool:
    """Whether the KServe venv (``make bench-peers`` builds it) is there."""
    return KSERVE_PYTHON.exists()


def start_kserve(logs: Path) -> ServerProcess:
    """The KServe custom model (bench/peers/kserve_peer.py) in its own venv; V2 gRPC on ``address``."""
    grpc_port, http_port = free_port(), free_port()
    limits = ["--grpc_max_send_message_length", str(1 << 30), "--grpc_max_receive_message_length", str(1 << 30)]
    argv = [
        str(KSERVE_PYTHON),
        str(BENCH / "peers" / "kserve_peer.py"),
        "--grpc_port",
        str(grpc_port),
        "--http_port",
        str(http_port),
        *limits,
    ]
    process, log = _spawn("kserve", argv, {}, logs)
    server = ServerProcess("kserve", process, f"127.0.0.1:{grpc_port}", log, {"http": f"127.0.0.1:{http_port}"})
    return _wait(server, lambda: _http_ok(f"http://127.0.0.1:{http_port}/v2/models/losses/ready"))
