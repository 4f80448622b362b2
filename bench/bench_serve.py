"""lossd the way users run it: ``lossd serve`` in its own process, clients in other processes, torch as the yardstick.

Every row is measured in this run: the server's median (client in another
process), in-process torch on the same tensors, their ratio, GB/s of payload;
the loopback TCP limit (two processes moving the same bytes) and the memcpy
limit are measured first. ``--peers`` adds a hand-written FastAPI raw-bytes
endpoint and a KServe custom model (its venv under bench/.peers, built by
``make bench-peers``). ``--profile SCENARIO`` records the server with py-spy
(bench/.peers/tools) while that scenario runs, then prints where the time went.

    python bench/bench_serve.py                 # a few minutes
    python bench/bench_serve.py --quick         # CI-sized
    python bench/bench_serve.py --peers --only ce_f32,small_seq
    python bench/bench_serve.py --only four_f32 --profile four_f32

Writes artifacts/bench-serve.json (and artifacts/bench-logs/, the servers' output).
Compare ratios within one run: on a shared machine absolute times drift.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_seconds  # noqa: E402
from _limits import grpc_floor_seconds, memcpy_seconds, tcp_round_trip_seconds, tcp_seconds  # noqa: E402
from _servers import (  # noqa: E402
    KSERVE_PYTHON,
    PEERS,
    ROOT,
    ServerProcess,
    kserve_available,
    start_fastapi,
    start_kserve,
    start_lossd,
)
from _workloads import FOUR, as_torch, logits_labels, torch_functions  # noqa: E402

from lossd.client.buffers import reuse_for_messages  # noqa: E402
from lossd.client.messages import DEFAULT_CHUNK_BYTES  # noqa: E402

DRIVER = Path(__file__).resolve().parent / "_driver.py"
ARTIFACTS = ROOT / "artifacts"
PY_SPY = PEERS / "tools" / "bin" / "py-spy"
TREE_ENV: dict[str, str] = {}  # --tree: PYTHONPATH of another checkout, for the lossd server and clients


@dataclass
class Scenario:
    """One row family: a workload and how much of it to run (default and --quick)."""

    name: str
    title: str
    kind: str  # repeat | sequential | concurrent | run | local | stream | auroc
    job: dict[str, Any]
    quick: dict[str, Any] = field(default_factory=dict)
    peers: bool = True


# The rows also measured on lossd serve --workers N: requests small enough that one process's
# Python, not the cores' arithmetic, bounds them.
WORKER_SCENARIOS = ("small_seq", "small_conc")

SCENARIOS = [
    Scenario(
        "ce_f32",
        "[4096, 1024] fp32 cross_entropy",
        "repeat",
        {"rows": 4096, "classes": 1024, "functions": ["cross_entropy"], "repeats": 15},
        {"repeats": 3},
    ),
    Scenario(
        "ce_f32_shm",
        "[4096, 1024] fp32 cross_entropy, shared memory",
        "repeat",
        {"rows": 4096, "classes": 1024, "functions": ["cross_entropy"], "repeats": 15, "shared_memory": True},
        {"repeats": 3},
        peers=False,
    ),
    Scenario(
        "ce_bf16",
        "[4096, 1024] bf16 cross_entropy",
        "repeat",
        {"rows": 4096, "classes": 1024, "functions": ["cross_entropy"], "dtype": "bfloat16", "repeats": 15},
        {"repeats": 3},
    ),
    Scenario(
        "four_f32",
        "[4096, 1024] fp32 + accuracy + ece + entropy",
        "repeat",
        {"rows": 4096, "classes": 1024, "functions": FOUR, "repeats": 15},
        {"repeats": 3},
    ),
    Scenario(
        "four_bf16",
        "[4096, 1024] bf16 + accuracy + ece + entropy",
        "repeat",
        {"rows": 4096, "classes": 1024, "functions": FOUR, "dtype": "bfloat16", "repeats": 15},
        {"repeats": 3},
    ),
    Scenario(
        "small_seq",
        "[64, 10] sequential (p50; p99 in notes)",
        "sequential",
        {"rows": 64, "classes": 10, "functions": ["cross_entropy"], "repeats": 2000},
        {"repeats": 100},
    ),
    Scenario(
        "small_conc",
        "[64, 10], 32 concurrent callers (per request)",
        "concurrent",
        {"rows": 64, "classes": 10, "functions": ["cross_entropy"], "callers": 32, "procs": 2, "duration": 10.0},
        {"duration": 1.0},
    ),
    Scenario(
        "vocab",
        "[512, 128256] fp32 cross_entropy",
        "repeat",
        {"rows": 512, "classes": 128256, "functions": ["cross_entropy"], "repeats": 3, "warmup": 1},
        {"rows": 64, "repeats": 1},
        peers=False,
    ),
    Scenario(
        "run",
        "client.run, [256, 100] batches, ce + accuracy (per batch)",
        "run",
        {"rows": 256, "classes": 100, "functions": ["cross_entropy", "accuracy"], "batches": 10_000},
        {"batches": 100},
    ),
    Scenario(
        "local",
        'client.run(compute="local"), [256, 32000] batches, ce + accuracy (per batch; ratio also over in-process lossd.kernels)',
        "local",
        {"rows": 256, "classes": 32000, "functions": ["cross_entropy", "accuracy"], "batches": 200},
        {"batches": 20},
        peers=False,
    ),
    Scenario(
        "stream",
        "evaluate_stream, [256, 100] batches, ce + accuracy (per batch)",
        "stream",
        {"rows": 256, "classes": 100, "functions": ["cross_entropy", "accuracy"], "batches": 10_000},
        {"batches": 100},
        peers=False,
    ),
    Scenario(
        "auroc",
        "client.run exact AUROC, [1000] binary batches (last 20 / first 20)",
        "auroc",
        {"rows": 1000, "batches": 200},
        {"batches": 40},
        peers=False,
    ),
]
PEER_BATCHES = 2000  # peers answer the "run" row with this many sequential requests (no exact totals to keep)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


# --- drivers ---------------------------------------------------------------------------------------


def drive(job: dict[str, Any], *, python: Path | str = sys.executable, procs: int = 1) -> list[dict[str, Any]]:
    """Run ``procs`` driver processes on ``job``; start them together once all are warm; their results."""
    env = {**os.environ, **TREE_ENV} if job["target"] == "lossd" else None
    children = [
        subprocess.Popen(
            [str(python), str(DRIVER), json.dumps(job)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        for _ in range(procs)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"driver for {job['target']}/{job['scenario']} failed (exit {child.wait()}): {line}")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            assert child.stdout is not None
            results.append(json.loads(child.stdout.readline()))
            child.wait(60)
        return results
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


# --- in-process torch on the same tensors ----------------------------------------------------------


def torch_seconds(s: Scenario, job: dict[str, Any]) -> float | None:
    """In-process torch on the scenario's tensors: per call, per request, or per batch."""
    if s.kind == "auroc":
        return None
    if s.kind in ("run", "local", "stream"):
        import torch

        pool = [logits_labels(job["rows"], job["classes"], seed) for seed in range(16)]
        pool_t = [(torch.from_numpy(z), torch.from_numpy(y)) for z, y in pool]
        count = min(job["batches"], 2000)

        def loop() -> None:
            for i in range(count):
                torch_functions(*pool_t[i % 16], job["functions"])

        return median_seconds(loop, repeats=3, warmup=1) / count
    z, y = logits_labels(job["rows"], job["classes"])
    import torch

    zt, yt = as_torch(z, job.get("dtype", "float32")), torch.from_numpy(y)
    repeats = 200 if s.kind in ("sequential", "concurrent") else max(3, job["repeats"])
    return median_seconds(lambda: torch_functions(zt, yt, job["functions"]), repeats=repeats)


def local_notes(job: dict[str, Any], per_batch: float, wire_bytes: list[int]) -> dict[str, Any]:
    """compute="local": the run's time per batch over in-process lossd.kernels (an Accumulator), and its wire bytes over the logits'."""
    import torch

    from lossd.kernels import Accumulator

    pool = [logits_labels(job["rows"], job["classes"], seed) for seed in range(16)]
    pool_t = [{"logits": torch.from_numpy(z), "labels": torch.from_numpy(y)} for z, y in pool]
    count = min(job["batches"], 200)

    def loop() -> None:
        acc = Accumulator(job["functions"])
        for i in range(count):
            acc.add(pool_t[i % 16])
        acc.result()

    kernels = median_seconds(loop, repeats=3, warmup=1) / count
    logits = job["rows"] * job["classes"] * 4
    return {
        "kernels_ms": round(kernels * 1e3, 3),
        "over_kernels": round(per_batch / kernels, 2),
        "wire_bytes_per_batch": round(statistics.median(wire_bytes)) if wire_bytes else None,
        "wire_over_logits": round(statistics.median(wire_bytes) / logits, 5) if wire_bytes else None,
    }


def payload_bytes(job: dict[str, Any]) -> int:
    """Bytes of logits and labels in one request (or one batch)."""
    width = 2 if job.get("dtype") == "bfloat16" else 4
    return int(job.get("rows", 0) * job.get("classes", 1) * width + job.get("rows", 0) * 8)


# --- one row ---------------------------------------------------------------------------------------


def measure(s: Scenario, target: str, server: ServerProcess, job: dict[str, Any]) -> dict[str, Any]:
    """Run scenario ``s`` against ``server``; the row's figures (seconds per call/request/batch and notes)."""
    job = {**job, "target": target, "address": server.address, "scenario": s.kind}
    python = KSERVE_PYTHON if target == "kserve" else sys.executable
    notes: dict[str, Any] = {}
    if s.kind == "concurrent":
        results = drive(job | {"callers": job["callers"] // job["procs"], "scenario": "concurrent"}, python=python, procs=job["procs"])
        latencies = [x for r in results for x in r["seconds"]]
        elapsed = max(r["elapsed"] for r in results)
        rate = len(latencies) / elapsed
        notes |= {
            "req_per_s": round(rate, 1),
            "p50_ms": round(percentile(latencies, 50) * 1e3, 2),
            "p99_ms": round(percentile(latencies, 99) * 1e3, 2),
        }
        return {"seconds": 1 / rate, "notes": notes}
    if s.kind == "run" and target != "lossd":
        job = job | {"scenario": "repeat", "repeats": min(job["batches"], PEER_BATCHES), "warmup": 5}
    elif s.kind == "sequential":
        job = job | {"scenario": "repeat", "warmup": 20}
    elif s.kind == "repeat":
        job = job | {"scenario": "repeat"}
    before = server.rss_bytes() if s.name == "vocab" and server.reset_peak() else None
    (result,) = drive(job, python=python)
    seconds = result["seconds"]
    if s.kind in ("run", "local", "stream"):
        per_batch = result["elapsed"] / job["batches"] if s.kind == "stream" else sum(seconds) / len(seconds)
        notes["batches_per_s"] = round(1 / per_batch, 1)
        if s.kind == "local":
            notes |= local_notes(job, per_batch, result["wire_bytes"])
        return {"seconds": per_batch, "notes": notes}
    if s.kind == "auroc":
        first, last = statistics.mean(seconds[:20]), statistics.mean(seconds[-20:])
        notes |= {"first20_ms": round(first * 1e3, 2), "last20_ms": round(last * 1e3, 2), "last_over_first": round(last / first, 2)}
        notes["total_s"] = round(sum(seconds), 2)
        return {"seconds": last, "notes": notes}
    if s.kind == "sequential":
        notes |= {"p50_ms": round(percentile(seconds, 50) * 1e3, 3), "p99_ms": round(percentile(seconds, 99) * 1e3, 3)}
    if before is not None:
        payload = payload_bytes(job)
        notes |= {
            "peak_extra_over_payload": round((server.peak_bytes() - before) / payload, 2),
            "peak_rss_over_payload": round(server.peak_bytes() / payload, 2),
            "rss_before_mb": round(before / 1e6),
        }
    return {"seconds": statistics.median(seconds), "notes": notes}


# --- profiling -------------------------------------------------------------------------------------


class Profiler:
    """py-spy recording the server (native frames, raw collapsed stacks) while one scenario runs."""

    def __init__(self, pid: int, out: Path, rate: int) -> None:
        if not PY_SPY.exists():
            raise SystemExit(f"--profile needs py-spy: {PEERS / 'tools'} (make bench-peers creates it)")
        self.out = out
        self.process = subprocess.Popen(
            [str(PY_SPY), "record", "--pid", str(pid), "--native", "--threads", "--format", "raw", "--rate", str(rate), "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # attached before the load starts

    def stop(self) -> None:
        """Stop recording and write the file."""
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)


# --- table -----------------------------------------------------------------------------------------


def fmt_ms(seconds: float | None) -> str:
    """Milliseconds, three significant digits."""
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def table(rows: list[dict[str, Any]], limits: dict[str, float], targets: list[str]) -> str:
    """Markdown: one line per scenario, lossd then each peer: median ms, × torch, GB/s; notes."""
    head = "| scenario | torch in process (ms) | " + " | ".join(f"{t} ms (× torch, GB/s)" for t in targets) + " | notes |"
    lines = [head, "| --- " * (len(targets) + 3) + "|"]
    by_scenario: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_scenario.setdefault(row["scenario"], {})[row["target"]] = row
    for cells in by_scenario.values():
        any_row = next(iter(cells.values()))
        parts = [any_row["title"], fmt_ms(any_row["torch_s"])]
        for t in targets:
            row = cells.get(t)
            if row is None:
                parts.append("–")
                continue
            ratio = f"{row['ratio']:.2f}×" if row["ratio"] is not None else "–"
            gbps = f", {row['gb_per_s']:.2f} GB/s" if row["gb_per_s"] else ""
            parts.append(f"{fmt_ms(row['seconds'])} ({ratio}{gbps})")
        notes = "; ".join(
            f"{t}: " + ", ".join(f"{k} {v}" for k, v in cells[t]["notes"].items()) for t in targets if t in cells and cells[t]["notes"]
        )
        parts.append(notes)
        lines.append("| " + " | ".join(parts) + " |")
    lines.append(
        f"\nLimits measured in this run, 16.8 MB: loopback TCP between two processes {limits['tcp_ms']:.2f} ms "
        f"({limits['tcp_gb_per_s']:.2f} GB/s); memcpy {limits['memcpy_ms']:.2f} ms ({limits['memcpy_gb_per_s']:.2f} GB/s). "
        f"Round trips: 100 bytes over loopback TCP {limits['tcp_round_trip_ms'] * 1e3:.0f} µs. grpcio itself, no lossd code (a blocking "
        f"client, a grpc.aio server in another process, lossd's HTTP/2 options): a health Check {limits['grpc_round_trip_ms']:.3f} ms, "
        f"the floor of the [64, 10] rows; 16.8 MB of raw bytes in one unary call {limits['grpc_16mb_ms']:.1f} ms, the floor of the 16 MB rows."
    )
    return "\n".join(lines)


def main() -> None:  # noqa: C901  (the flow reads top to bottom)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized runs (seconds)")
    parser.add_argument("--peers", action="store_true", help="also measure FastAPI and KServe (make bench-peers)")
    parser.add_argument("--only", default="", help="comma-separated scenario names: " + ",".join(s.name for s in SCENARIOS))
    parser.add_argument("--profile", default="", help="record the server with py-spy during this scenario")
    parser.add_argument("--profile-rate", type=int, default=200)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply repeats, batches and durations")
    parser.add_argument("--tree", type=Path, help="run lossd (server and client) from this checkout instead of the installed one")
    parser.add_argument("--workers", type=int, default=2, help="also measure the [64, 10] rows on lossd serve --workers N (1: not)")
    parser.add_argument("--pin", action="store_true", help="LOSSD_PIN_EVENT_LOOP=true on every lossd server")
    parser.add_argument("--json", type=Path, default=ARTIFACTS / "bench-serve.json")
    args = parser.parse_args()

    if args.tree:
        tree = args.tree.resolve()
        TREE_ENV["PYTHONPATH"] = os.pathsep.join(str(tree / part) for part in ("kernels", "client", "server"))
    wanted = [s for s in SCENARIOS if not args.only or s.name in args.only.split(",")]
    logs = ARTIFACTS / "bench-logs"
    info = machine()
    print(f"# lossd serve benchmark, {info['date']}: {info['cpu']}, {info['cpus']} CPUs, load {info['load_average']}", flush=True)

    # This process times in-process torch and is grpcio's floor client: the malloc tuning every lossd
    # client applies (lossd.client.buffers) applies here too, so the ratios compare code, not glibc thresholds.
    reuse_for_messages(DEFAULT_CHUNK_BYTES)
    nbytes = 4096 * 1024 * 4
    tcp, memcpy = tcp_seconds(nbytes), memcpy_seconds(nbytes)
    limits = {"tcp_ms": tcp * 1e3, "tcp_gb_per_s": nbytes / tcp / 1e9, "memcpy_ms": memcpy * 1e3, "memcpy_gb_per_s": nbytes / memcpy / 1e9}
    grpc_small, grpc_large = grpc_floor_seconds(nbytes)
    limits |= {
        "tcp_round_trip_ms": tcp_round_trip_seconds() * 1e3,
        "grpc_round_trip_ms": grpc_small * 1e3,
        "grpc_16mb_ms": grpc_large * 1e3,
    }

    starters: dict[str, Callable[[Path], ServerProcess]] = {
        "lossd": lambda logs: start_lossd(logs, env={**TREE_ENV, "LOSSD_ALLOW_SHARED_MEMORY": "true"})
    }
    if args.pin:
        TREE_ENV["LOSSD_PIN_EVENT_LOOP"] = "true"
    workers_target = f"lossd ×{args.workers}"
    if args.workers > 1 and any(s.name in WORKER_SCENARIOS for s in wanted):
        env = {
            **TREE_ENV,
            "LOSSD_WORKERS": str(args.workers),
            "LOSSD_DRAIN_SECONDS": "0",
        }
        starters[workers_target] = lambda logs: start_lossd(logs, env=env, name=f"lossd-workers{args.workers}")
    if args.peers:
        starters["fastapi"] = start_fastapi
        if kserve_available():
            starters["kserve"] = start_kserve
        else:
            print(f"KServe venv missing ({PEERS / 'kserve'}); run make bench-peers. Measuring without it.", file=sys.stderr)
    servers: dict[str, ServerProcess] = {}
    rows: list[dict[str, Any]] = []
    try:
        for name, start in starters.items():
            servers[name] = start(logs)
        for s in wanted:
            job = {**s.job, **(s.quick if args.quick else {})}
            for key in ("repeats", "batches", "duration"):
                if key in job and args.scale != 1.0:
                    job[key] = max(1, type(job[key])(job[key] * args.scale))
            base = torch_seconds(s, job)
            for target, server in servers.items():
                if target != "lossd" and not s.peers or target == workers_target and s.name not in WORKER_SCENARIOS:
                    continue
                if target == "kserve" and job.get("dtype") == "bfloat16":
                    print(f"{s.name:<11} kserve   skipped: KServe 0.21 rejects BF16 inputs ('invalid content type')", flush=True)
                    continue
                profiler = (
                    Profiler(server.pid, ARTIFACTS / f"profile-{s.name}-{target}.txt", args.profile_rate)
                    if s.name == args.profile and target == "lossd"
                    else None
                )
                try:
                    got = measure(s, "lossd" if target == workers_target else target, server, job)
                finally:
                    if profiler is not None:
                        profiler.stop()
                seconds = got["seconds"]
                size = payload_bytes(job) if s.kind != "auroc" else 0
                row = {
                    "scenario": s.name,
                    "title": s.title,
                    "target": target,
                    "seconds": seconds,
                    "torch_s": base,
                    "ratio": seconds / base if base else None,
                    "gb_per_s": size / seconds / 1e9 if size and s.kind == "repeat" else None,
                    "notes": got["notes"],
                    "job": job,
                }
                rows.append(row)
                print(
                    f"{s.name:<11} {target:<8} {fmt_ms(seconds):>8} ms  torch {fmt_ms(base):>8} ms  {json.dumps(got['notes'])}", flush=True
                )
    finally:
        for server in servers.values():
            server.stop()

    print()
    print(table(rows, limits, list(servers)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": info, "limits": limits, "rows": rows, "scenarios": [asdict(s) for s in wanted]}, indent=1))
    print(f"\nwrote {args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}")
    if args.profile:
        from _profile import summarize

        for path in sorted(ARTIFACTS.glob(f"profile-{args.profile}-*.txt")):
            print(f"\n{path.name}\n{summarize(path)}")


if __name__ == "__main__":
    main()
