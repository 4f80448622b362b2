"""A request that kills its server is never replayed onto the next one; a server not up yet is still waited for.

Two real server processes whose Evaluate (and EvaluateStream) handler kills
the process sit behind one multi-address target. One call must kill exactly
one of them and fail with UNAVAILABLE saying the server was lost during the
call: the client's retries never replay a call that may have reached a
handler (lossd.client.retries). A call that could not connect at all (the
server is not up yet) never reached one, and is retried until it is up.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from lossd.client import AsyncClient, Client, UnavailableError
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

# A lossd-like server whose handlers die like a segfaulting replica: no answer, the connection just closes.
FATAL_SERVER = """
import os
from concurrent import futures
import grpc
from lossd.v1 import lossd_pb2_grpc as pb_grpc

class Fatal(pb_grpc.LossServiceServicer):
    def Evaluate(self, request, context):
        os._exit(3)

    def EvaluateStream(self, request_iterator, context):
        for _ in request_iterator:
            pass
        os._exit(3)

server = grpc.server(futures.ThreadPoolExecutor(2))
pb_grpc.add_LossServiceServicer_to_server(Fatal(), server)
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""
BATCH = {"logits": np.zeros((4, 3), np.float32), "labels": np.zeros(4, np.int64)}
LOST = "lost during the call"


@pytest.fixture
def fatal_pair() -> Iterator[tuple[str, list[subprocess.Popen[str]]]]:
    """Two fatal servers behind one target that resolves to both."""
    servers = [subprocess.Popen([sys.executable, "-c", FATAL_SERVER], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        ports = [int(s.stdout.readline()) for s in servers if s.stdout is not None]
        yield "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports), servers
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
            server.wait(30)
            if server.stdout is not None:
                server.stdout.close()


def deaths(servers: list[subprocess.Popen[str]]) -> int:
    time.sleep(1.0)  # a replayed attempt would have reached the second server by now
    return sum(server.poll() is not None for server in servers)


@pytest.mark.parametrize("policy", ["pick_first", "round_robin"])
def test_a_call_that_killed_its_server_is_not_replayed_onto_the_next(
    fatal_pair: tuple[str, list[subprocess.Popen[str]]], policy: str
) -> None:
    target, servers = fatal_pair
    with Client(target, timeout=20, options=[("grpc.lb_policy_name", policy)]) as client:
        with pytest.raises(UnavailableError, match=LOST) as info:
            client.evaluate(BATCH, "cross_entropy")
    assert not info.value.unreached and not info.value.retry_marked
    assert deaths(servers) == 1, "the request that killed one server was replayed onto the other"


def test_a_stream_that_killed_its_server_is_not_replayed(fatal_pair: tuple[str, list[subprocess.Popen[str]]]) -> None:
    target, servers = fatal_pair
    with Client(target, timeout=20) as client, pytest.raises(UnavailableError, match=LOST):
        client.evaluate_stream([BATCH, BATCH], "cross_entropy")
    assert deaths(servers) == 1


def test_the_async_client_does_not_replay_it_either(fatal_pair: tuple[str, list[subprocess.Popen[str]]]) -> None:
    target, servers = fatal_pair

    async def main() -> None:
        async with AsyncClient(target, timeout=20, options=[("grpc.lb_policy_name", "round_robin")]) as client:
            with pytest.raises(UnavailableError, match=LOST):
                await client.evaluate(BATCH, "cross_entropy")

    asyncio.run(main())
    assert deaths(servers) == 1


class Answering(pb_grpc.LossServiceServicer):
    """Answers every Evaluate; the first ``unavailable`` calls get UNAVAILABLE (marked retryable when ``marked``)."""

    def __init__(self, unavailable: int = 0, marked: bool = True) -> None:
        self.unavailable, self.marked, self.calls = unavailable, marked, 0
        self.lock = threading.Lock()

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:
        with self.lock:
            self.calls += 1
            refuse = self.calls <= self.unavailable
        if refuse:
            if self.marked:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", "10"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return pb.EvaluateResponse(
            results=[pb.FunctionResult(alias="x", function="x", values={"value": 1.0})], request_id=request.request_id
        )


def serve(service: Answering, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_LossServiceServicer_to_server(service, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_server_not_up_yet_is_waited_for(asynchronous: bool) -> None:
    """Refused connections never reached a server: retried with backoff until it is up (about a second here)."""
    service, port, started = Answering(), free_port(), []
    timer = threading.Timer(0.3, lambda: started.append(serve(service, port)[0]))
    timer.start()
    try:
        if asynchronous:

            async def main() -> float:
                async with AsyncClient(f"127.0.0.1:{port}", timeout=20) as client:
                    return (await client.evaluate({"x": [1.0]}, "x"))["x"].value

            value = asyncio.run(main())
        else:
            with Client(f"127.0.0.1:{port}", timeout=20) as client:
                value = client.evaluate({"x": [1.0]}, "x")["x"].value
        assert value == 1.0 and service.calls == 1
    finally:
        timer.join()
        for server in started:
            server.stop(None)


def test_a_server_that_never_comes_up_fails_fast_as_unreached() -> None:
    with Client(f"127.0.0.1:{free_port()}", timeout=20) as client:
        begin = time.monotonic()
        with pytest.raises(UnavailableError, match="failed to connect") as info:
            client.evaluate({"x": [1.0]}, "x")
    assert info.value.unreached and LOST not in str(info.value)
    assert time.monotonic() - begin < 10, "five attempts with a backoff of at most 2 s, not the whole deadline"


@pytest.mark.parametrize(("marked", "calls"), [(True, 3), (False, 1)])
def test_an_unavailable_answer_is_retried_only_when_marked_retryable(marked: bool, calls: int) -> None:
    service = Answering(unavailable=2, marked=marked)
    server, port = serve(service)
    try:
        with Client(f"127.0.0.1:{port}", timeout=20) as client:
            if marked:
                assert client.evaluate({"x": [1.0]}, "x")["x"].value == 1.0
            else:
                with pytest.raises(UnavailableError, match="draining"):
                    client.evaluate({"x": [1.0]}, "x")
        assert service.calls == calls
    finally:
        server.stop(None)


def test_the_gateway_does_not_replay_a_request_that_killed_its_replica(fatal_pair: tuple[str, list[subprocess.Popen[str]]]) -> None:
    import httpx
    from replica import Replica

    target, servers = fatal_pair
    addresses = target.removeprefix("ipv4:").split(",")
    gateway = Replica(backends=addresses).start()
    body = {
        "tensors": {
            "logits": {"dtype": "float32", "shape": [4, 3], "data": BATCH["logits"].tolist()},
            "labels": {"dtype": "int64", "shape": [4], "data": BATCH["labels"].tolist()},
        },
        "functions": ["cross_entropy"],
    }
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            response = client.post("/v1/evaluate", json=body)
    finally:
        gateway.stop()
    assert response.status_code == 503, response.text
    assert deaths(servers) == 1  # the second replica never saw the request
