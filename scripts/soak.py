"""Soak ``lossd serve`` at twice its measured saturation with mixed sizes; fail on leaks or unexpected errors.

    python scripts/soak.py                 # 30 minutes (make soak)
    SOAK_SECONDS=240 python scripts/soak.py

The server runs as its own process; the load comes from SOAK_WORKERS client
processes (default 4), each with several threads. First the saturation is
measured: a closed-loop ramp (1, 2, 4, 8 callers per process) of the mixed
workload, its best requests/s. Then the soak paces requests at twice that rate
(a caller that falls behind sends at once, so the offered load stays above what
the server can do and admission control has to refuse some). The mix: mostly
cross_entropy on [64, 10] logits, some on [4096, 1024] float32 (16 MiB), a few
EvaluateStream calls of 8 small batches; every answer's value is checked against
numpy.

Printed: the server's RSS and open file descriptors (/proc/PID/fd) after the
warm-up and at the end (both measured with no client connected, after the
server's idle trim of its heap), RSS samples during the soak (busy), p50/p99
latency by kind, counts by status code. Exit 1 when RSS grew 5% or more, the
descriptors grew, or any call ended other than OK or RESOURCE_EXHAUSTED (the
deliberate refusal); exit 2 when the server did not start. Bounded: every call
has a deadline and the whole run a wall-clock limit.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "1800"))
WORKERS = int(os.environ.get("SOAK_WORKERS", "4"))
THREADS = int(os.environ.get("SOAK_THREADS", "12"))  # callers per worker process during the soak
RAMP = (1, 2, 4, 8)  # callers per worker process while saturation is measured
RAMP_STEP_SECONDS = float(os.environ.get("SOAK_RAMP_STEP_SECONDS", "6"))
# lossd keeps large freed buffers while busy (server/lossd/server/allocator.py) and gives them back
# when idle; the warm-up fills the caches that do stay (monitoring series, history, gRPC's pools).
# Growth measured idle after it is what a leak would show.
WARMUP_SECONDS = float(os.environ.get("SOAK_WARMUP_SECONDS", min(180.0, max(30.0, SOAK_SECONDS / 10))))
IDLE_TRIM_SECONDS = 3.0  # past the server's 2 s idle delay before it trims the heap
SAMPLES = 8  # RSS printed this many times during the soak: a plateau or a slope
MAX_RSS_GROWTH = 0.05
CALL_TIMEOUT = 60.0
# kind -> share of the calls: mostly small, some 16 MiB, a few streams
MIX = (("small", 0.90), ("large", 0.07), ("stream", 0.03))
ACCEPTED = {"OK", "RESOURCE_EXHAUSTED"}
_ANNOUNCE = re.compile(r"lossd serving gRPC on (\S+?)(?: \(TLS\))?, HTTP on (\S+)")


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return float(np.mean(log_z - x[np.arange(len(labels)), labels]))


def _batch(rng: np.random.Generator, rows: int, classes: int) -> dict[str, np.ndarray]:
    return {"logits": rng.standard_normal((rows, classes)).astype(np.float32), "labels": rng.integers(0, classes, rows)}


class Caller:
    """One thread's calls: a request of a kind drawn from MIX, its value checked, (kind, seconds, status) kept."""

    def __init__(self, client: Any, seed: int, large: dict[str, np.ndarray], large_value: float) -> None:
        self.client = client
        self.rng = np.random.default_rng(seed)
        self.large, self.large_value = large, large_value  # one per process: the soak measures the server, not numpy
        self.records: list[tuple[str, float, str]] = []

    def call(self) -> None:
        from lossd.client.errors import LossdError

        kind = self.rng.choice([k for k, _ in MIX], p=[p for _, p in MIX])
        t0 = time.perf_counter()
        try:
            if kind == "small":
                batch = _batch(self.rng, 64, 10)
                value = self.client.evaluate(batch, "cross_entropy")["cross_entropy"].value
                expected = _cross_entropy(batch["logits"], batch["labels"])
            elif kind == "large":
                value = self.client.evaluate(self.large, "cross_entropy")["cross_entropy"].value
                expected = self.large_value
            else:
                batches = [_batch(self.rng, 64, 10) for _ in range(8)]
                value = self.client.evaluate_stream(batches, "cross_entropy")["cross_entropy"].value
                expected = _cross_entropy(np.concatenate([b["logits"] for b in batches]), np.concatenate([b["labels"] for b in batches]))
            status = "OK" if abs(value - expected) <= 1e-5 * max(1.0, abs(expected)) else "WRONG_VALUE"
        except LossdError as exc:
            status = exc.code.name
        except Exception as exc:  # anything else is a soak failure too, named by its type
            status = f"CLIENT_{type(exc).__name__}"
        self.records.append((str(kind), time.perf_counter() - t0, status))


def _worker(address: str, index: int, callers: int, seconds: float, rate: float, out: Any) -> None:
    """A client process: ``callers`` threads for ``seconds``, ``rate`` calls/s in all (0: as fast as answered)."""
    from lossd.client import Client

    # attempts=1: a refusal is counted as such here, not hidden by the channel's retries.
    with Client(address, timeout=CALL_TIMEOUT, attempts=1) as client:
        large = _batch(np.random.default_rng(index), 4096, 1024)
        large_value = _cross_entropy(large["logits"], large["labels"])
        threads_callers = [Caller(client, index * 1000 + i, large, large_value) for i in range(callers)]
        end = time.monotonic() + seconds
        interval = callers / rate if rate > 0 else 0.0

        def loop(caller: Caller, phase: float) -> None:
            next_at = time.monotonic() + phase
            while time.monotonic() < end:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                caller.call()
                next_at = max(next_at + interval, time.monotonic() - interval)  # behind: at once, no burst to catch up

        threads = [threading.Thread(target=loop, args=(c, interval * i / callers)) for i, c in enumerate(threads_callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    out.put([r for c in threads_callers for r in c.records])


def drive(address: str, callers: int, seconds: float, rate: float = 0.0) -> list[tuple[str, float, str]]:
    """WORKERS client processes for ``seconds``; every call's (kind, seconds, status)."""
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=_worker, args=(address, i, callers, seconds, rate / WORKERS, out)) for i in range(WORKERS)]
    for p in processes:
        p.start()
    records: list[tuple[str, float, str]] = []
    for _ in processes:
        records.extend(out.get(timeout=seconds + 4 * CALL_TIMEOUT))
    for p in processes:
        p.join(30)
    return records


class Server:
    """``lossd serve`` on free ports, as an operator runs it."""

    def __init__(self) -> None:
        env = {**os.environ, "LOSSD_GRPC_PORT": "0", "LOSSD_HTTP_PORT": "0", "LOSSD_LOG_LEVEL": "warning"}
        env.setdefault("LOSSD_DEVICE", "cpu")
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lossd.server", "serve"], env=env, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        assert self.process.stdout is not None
        match = _ANNOUNCE.search(self.process.stdout.readline())
        if match is None:
            self.process.kill()
            self.log.seek(0)
            sys.exit(f"soak: lossd serve did not start: {self.log.read()[-2000:]}")
        self.address = match.group(1)

    def rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024  # type: ignore[union-attr]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def quiet(self, fds_at_most: int | None = None) -> tuple[int, int]:
        """(RSS, fds) once the clients are gone: sockets take a moment to close on the server's side.

        The server keeps freed message buffers while requests come and gives them
        back 2 s after the last one (allocator.IdleTrim); the first reading waits
        past that, so that both readings measure what live objects hold."""
        deadline = time.monotonic() + 10
        time.sleep(IDLE_TRIM_SECONDS)
        while True:
            time.sleep(1.0)
            rss, fds = self.rss(), self.fds()
            if fds_at_most is None or fds <= fds_at_most or time.monotonic() > deadline:
                return rss, fds

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        self.log.seek(0)
        return self.log.read()


def _sample_rss(server: Server, seconds: float) -> None:
    started = time.monotonic()
    for _ in range(1, SAMPLES):
        time.sleep(seconds / SAMPLES)
        if server.process.poll() is not None:
            return
        print(f"soak: at {time.monotonic() - started:5.0f} s: RSS {server.rss() / 2**20:.1f} MiB, {server.fds()} open fds", flush=True)


def _throughput(records: list[tuple[str, float, str]], seconds: float) -> float:
    return sum(1 for _, _, s in records if s == "OK") / seconds


def _report(records: list[tuple[str, float, str]], seconds: float) -> collections.Counter[str]:
    statuses = collections.Counter(s for _, _, s in records)
    print(f"soak: {len(records)} calls in {seconds:.0f} s ({len(records) / seconds:.1f}/s offered and answered)")
    print(f"soak: by status: {dict(statuses.most_common())}")
    for kind in [k for k, _ in MIX] + ["all"]:
        ok = np.array([t for k, t, s in records if s == "OK" and kind in (k, "all")])
        if ok.size:
            p50, p99 = np.percentile(ok, [50, 99]) * 1000
            print(f"soak: {kind:>6}: {ok.size} OK, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    return statuses


def main() -> int:
    """Measure saturation, soak at twice it, print the figures; the exit code says whether it held."""
    started = time.monotonic()
    server = Server()
    print(f"soak: lossd serve pid {server.process.pid} on {server.address}; {WORKERS} client processes; {SOAK_SECONDS:.0f} s soak")
    try:
        best = 0.0
        for callers in RAMP:
            rate = _throughput(drive(server.address, callers, RAMP_STEP_SECONDS), RAMP_STEP_SECONDS)
            print(f"soak: saturation ramp: {callers * WORKERS:>3} callers: {rate:.1f} OK/s")
            best = max(best, rate)
        target = 2 * best
        print(f"soak: saturation {best:.1f} requests/s; soak offered {target:.1f} requests/s")
        drive(server.address, THREADS, WARMUP_SECONDS, target)  # warm-up: allocator pools and caches filled
        rss0, fds0 = server.quiet()
        print(f"soak: after {WARMUP_SECONDS:.0f} s warm-up: RSS {rss0 / 2**20:.1f} MiB, {fds0} open fds")
        sampler = threading.Thread(target=_sample_rss, args=(server, SOAK_SECONDS), daemon=True)
        sampler.start()
        records = drive(server.address, THREADS, SOAK_SECONDS, target)
        rss1, fds1 = server.quiet(fds_at_most=fds0)
    finally:
        alive = server.process.poll() is None
        log = server.stop()
    growth = rss1 / rss0 - 1
    print(f"soak: at the end: RSS {rss1 / 2**20:.1f} MiB ({growth:+.1%}), {fds1} open fds ({fds1 - fds0:+d})")
    statuses = _report(records, SOAK_SECONDS)
    failures = []
    if not alive:
        failures.append("the server died")
    if growth >= MAX_RSS_GROWTH:
        failures.append(f"RSS grew {growth:.1%} (limit {MAX_RSS_GROWTH:.0%})")
    if fds1 > fds0:
        failures.append(f"open file descriptors grew from {fds0} to {fds1}")
    unexpected = {s: n for s, n in statuses.items() if s not in ACCEPTED}
    if unexpected:
        failures.append(f"calls ended other than OK or RESOURCE_EXHAUSTED: {unexpected}")
    if "Traceback" in log:
        failures.append(f"the server logged a traceback:\n{log[-3000:]}")
    print(f"soak: {time.monotonic() - started:.0f} s in all")
    for failure in failures:
        print(f"soak: FAILED: {failure}")
    if not failures:
        print("soak: passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
