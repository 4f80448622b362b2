"""The whole stack on loopback: lossd replicas (gRPC + gateway, in-process on port 0) and a real Prometheus.

External programs come from Debian (scripts/install_e2e_deps.sh). A test that
needs one skips when it is missing, except under CI=true, where it fails.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from replica import Replica

from helpers import require_binary

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/rules"
ARTIFACTS = ROOT / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A Prometheus server on a loopback port scraping ``targets`` every ``interval``, with the repo's rules."""

    def __init__(self, binary: str, workdir: Path, targets: list[str], interval: str = "500ms") -> None:
        self.workdir = workdir
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "rule_files": [str(RULES / "*.yml")],
            "scrape_configs": [{"job_name": "lossd", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.process.returncode}:\n{(self.workdir / 'prometheus.log').read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout}s")

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def targets_up(self) -> int:
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        return sum(1 for t in body["data"]["activeTargets"] if t["health"] == "up")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition()`` until it returns something truthy; fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[Replica]]:
    started = [Replica().start() for _ in range(2)]
    yield started
    for r in started:
        r.stop()


@pytest.fixture(scope="module")
def prometheus(replicas: list[Replica], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = require_binary("prometheus")
    server = Prometheus(binary, tmp_path_factory.mktemp("prometheus"), [r.url.removeprefix("http://") for r in replicas])
    try:
        wait_for(lambda: server.targets_up() == len(replicas), 30, "both replicas to be scraped")
        yield server
    finally:
        server.stop()
