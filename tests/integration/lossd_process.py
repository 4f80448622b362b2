"""``lossd serve`` as a child process on free ports: what an operator runs, for fault and start-up tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["LossdProcess", "LOSSD_SERVE"]

LOSSD_SERVE = [sys.executable, "-m", "lossd.server", "serve"]
_ANNOUNCE = re.compile(r"lossd serving gRPC on (\S+?)(?: \(TLS\))?, HTTP on (\S+)")


class LossdProcess:
    """Started at construction; ``grpc_address`` and ``url`` as the process announced them."""

    def __init__(self, **settings: object) -> None:
        env = {**os.environ, "LOSSD_DEVICE": "cpu", "LOSSD_GRPC_PORT": "0", "LOSSD_HTTP_PORT": "0", "LOSSD_LOG_LEVEL": "warning"}
        env.update({f"LOSSD_{k.upper()}": str(v) for k, v in settings.items()})
        self._stderr = tempfile.TemporaryFile(mode="w+")  # read at the end: a pipe nobody reads could fill and block the server
        self.process = subprocess.Popen(LOSSD_SERVE, env=env, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the announcement comes once both ports are bound
        match = _ANNOUNCE.search(line)
        if match is None:
            self.process.kill()
            raise RuntimeError(f"lossd serve did not start: {line!r} {self.wait(30)}")
        self.grpc_address, self.url = match.group(1), match.group(2)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once the process has exited."""
        out, _ = self.process.communicate(timeout=timeout)
        self._stderr.seek(0)
        err = self._stderr.read()
        self._stderr.close()
        return self.process.returncode, out, err

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        if not self._stderr.closed:
            self.wait(30)

    def __enter__(self) -> LossdProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)
