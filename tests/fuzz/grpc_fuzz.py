"""Raw-gRPC fuzzer: mutated lossd.v1 requests against a separately started ``lossd serve`` (``make fuzz``).

Starts the server on free ports, then several client processes send
FUZZ_REQUESTS requests in all (default 1,000,000): valid batches of random
catalogue functions with 0-4 mutations of tensors, params, inputs, aliases,
prior states, batch ids, plus Finalize requests of mutated states and short
streams.  Prints the counts by outcome (status code) and exits 1 on any
INTERNAL, UNKNOWN, hang (DEADLINE_EXCEEDED under a generous deadline),
server death, or an "Exception ignored" line in the server's log.

    FUZZ_REQUESTS=20000 FUZZ_WORKERS=3 python tests/fuzz/grpc_fuzz.py
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: catalogue_inputs
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/fuzz: mutations

from mutations import Mutator  # noqa: E402

from lossd.v1 import lossd_pb2 as pb  # noqa: E402
from lossd.v1 import lossd_pb2_grpc as pb_grpc  # noqa: E402

DEADLINE_SECONDS = 120.0
BAD = ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "UNAVAILABLE")
OPTIONS = [("grpc.max_send_message_length", 512 * 1024 * 1024), ("grpc.max_receive_message_length", 512 * 1024 * 1024)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    grpc_port, http_port = _free_port(), _free_port()
    env = {**os.environ, "LOSSD_DEVICE": "cpu", "LOSSD_LOG_LEVEL": "warning"}
    lossd = Path(sys.executable).with_name("lossd")
    command = [str(lossd), "serve", "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    with log_path.open("wb") as log:  # the server writes to its own copy of the descriptor
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(address) as channel:
        while True:
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
                return process, address
            except grpc.FutureTimeoutError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    tail = log_path.read_text(errors="replace").splitlines()[-5:]
                    raise SystemExit("lossd serve did not start:\n" + "\n".join(tail)) from None


def _send(stub: Any, m: Mutator, kind: str) -> pb.EvaluateResponse:
    if kind == "Finalize":
        return stub.Finalize(m.finalize_request(), timeout=DEADLINE_SECONDS)
    if kind == "EvaluateStream":
        return stub.EvaluateStream(iter(m.stream_requests()), timeout=DEADLINE_SECONDS)
    return stub.Evaluate(m.evaluate_request(), timeout=DEADLINE_SECONDS)


def worker(args: tuple[str, int, int]) -> tuple[collections.Counter[str], list[str]]:
    """Send ``count`` requests; return counts by (rpc, outcome) and a few examples of bad outcomes."""
    address, seed, count = args
    counts: collections.Counter[str] = collections.Counter()
    examples: list[str] = []
    rng = random.Random(seed)
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        m = Mutator(stub.ListFunctions(pb.ListFunctionsRequest(), timeout=60), rng)
        for _ in range(count):
            kind = rng.choices(("Evaluate", "Finalize", "EvaluateStream"), (0.75, 0.15, 0.10))[0]
            try:
                response = _send(stub, m, kind)
                m.remember(response)
                outcome = "OK"
            except grpc.RpcError as exc:
                outcome = exc.code().name
                if outcome in BAD and len(examples) < 5:
                    examples.append(f"{kind} {outcome} (worker seed {seed}): {exc.details()}")
            counts[f"{kind} {outcome}"] += 1
    return counts, examples


def main() -> int:
    total = int(os.environ.get("FUZZ_REQUESTS", "1000000"))
    workers = int(os.environ.get("FUZZ_WORKERS", str(max(2, min(4, os.cpu_count() or 2)))))
    chunk = int(os.environ.get("FUZZ_CHUNK", "500"))
    log_path = Path(tempfile.mkdtemp(prefix="lossd-fuzz-")) / "server.log"
    server, address = start_server(log_path)
    print(f"fuzzing {address}: {total} requests from {workers} client processes; server log {log_path}", flush=True)
    counts: collections.Counter[str] = collections.Counter()
    examples: list[str] = []
    started = time.monotonic()
    jobs = [(address, seed, min(chunk, total - seed * chunk)) for seed in range((total + chunk - 1) // chunk)]
    died = False
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for i, (c, e) in enumerate(pool.imap_unordered(worker, jobs)):
            counts.update(c)
            examples += e[: max(0, 20 - len(examples))]
            if server.poll() is not None:
                died = True
                break
            if i % 20 == 19:
                done = sum(counts.values())
                print(f"  {done} requests in {time.monotonic() - started:.0f} s; bad so far: {_bad(counts)}", flush=True)
    alive = server.poll() is None and not died
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
    elapsed = time.monotonic() - started
    print(f"\n{sum(counts.values())} requests in {elapsed:.0f} s ({sum(counts.values()) / elapsed:.0f}/s)")
    by_code: collections.Counter[str] = collections.Counter()
    for key, n in counts.items():
        by_code[key.split()[1]] += n
    for code, n in by_code.most_common():
        print(f"  {code:20s} {n}")
    print("by RPC:")
    for key, n in sorted(counts.items()):
        print(f"  {key:40s} {n}")
    print(f"server deaths: {0 if alive else 1}")
    # Python's words for an error nobody could raise (a finalizer, a hook): noise that hides a bug.
    ignored = log_path.read_text(errors="replace").count("Exception ignored")
    print(f"'Exception ignored' in the server log: {ignored}")
    bad = _bad(counts)
    if bad or not alive or ignored:
        print(f"\nFAILED: {bad} bad outcomes; server alive: {alive}; 'Exception ignored': {ignored}")
        for e in examples:
            print("  " + e[:500])
        print(f"server log (tracebacks under the request ids): {log_path}")
        return 1
    return 0


def _bad(counts: collections.Counter[str]) -> int:
    return sum(n for key, n in counts.items() if key.split()[1] in BAD)


if __name__ == "__main__":
    sys.exit(main())
