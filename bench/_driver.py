"""A benchmark client in its own process: ``python bench/_driver.py '<json job>'``, one JSON result on stdout.

The job names a target (lossd, fastapi, kserve), the server's address, a
scenario and its sizes. The driver builds its tensors (bench/_workloads.py),
connects, warms up, prints ``ready`` and waits for ``go`` on stdin (so that
concurrent drivers start together), runs the scenario and prints
``{"seconds": [...], ...}``. The KServe driver runs in the KServe venv.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workloads import as_torch, binary_scores, logits_labels  # noqa: E402

Call = Callable[[], object]


def _raw(z: Any) -> bytes:
    """The bytes of a float32 array or a torch bfloat16 tensor."""
    if hasattr(z, "dtype") and str(z.dtype) == "torch.bfloat16":
        return bytes(z.view(__import__("torch").int16).numpy().data)
    return bytes(memoryview(z))


def _logits(job: dict[str, Any]) -> tuple[Any, Any]:
    z, y = logits_labels(job["rows"], job["classes"], job.get("seed", 0))
    return (as_torch(z, "bfloat16") if job.get("dtype") == "bfloat16" else z), y


# --- one call, blocking and async, per target -------------------------------------------------------


def lossd_calls(job: dict[str, Any]) -> tuple[Call, Callable[[], Awaitable[object]]]:
    """lossd.client.Client.evaluate and AsyncClient.evaluate on the job's batch."""
    from lossd.client import AsyncClient, Client

    z, y = _logits(job)
    tensors, functions = {"logits": z, "labels": y}, job["functions"]
    shared = bool(job.get("shared_memory", False))  # the ce_f32_shm row
    client = Client(job["address"], shared_memory=shared)
    holder: dict[str, AsyncClient] = {}

    async def acall() -> object:
        if "c" not in holder:
            holder["c"] = AsyncClient(job["address"], shared_memory=shared)
        return await holder["c"].evaluate(tensors, functions)

    return (lambda: client.evaluate(tensors, functions)), acall


def fastapi_calls(job: dict[str, Any]) -> tuple[Call, Callable[[], Awaitable[object]]]:
    """httpx posts of the raw bytes (the body built per call, as a client would)."""
    import httpx

    z, y = _logits(job)
    url = f"http://{job['address']}/evaluate"
    params = {"functions": ",".join(job["functions"])}
    headers = {"x-rows": str(job["rows"]), "x-classes": str(job["classes"]), "x-dtype": job.get("dtype", "float32")}
    client = httpx.Client(timeout=600)
    holder: dict[str, httpx.AsyncClient] = {}

    def call() -> object:
        reply = client.post(url, params=params, headers=headers, content=_raw(z) + _raw(y))
        reply.raise_for_status()
        return reply.json()

    async def acall() -> object:
        if "c" not in holder:
            holder["c"] = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256))
        reply = await holder["c"].post(url, params=params, headers=headers, content=_raw(z) + _raw(y))
        reply.raise_for_status()
        return reply.json()

    return call, acall


def kserve_calls(job: dict[str, Any]) -> tuple[Call, Callable[[], Awaitable[object]]]:
    """V2 gRPC ModelInfer with raw input contents (built per call)."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as v2
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as v2_grpc

    z, y = _logits(job)
    datatype = "BF16" if job.get("dtype") == "bfloat16" else "FP32"
    options = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(job["address"], options=options))
    holder: dict[str, Any] = {}

    def request() -> Any:
        return v2.ModelInferRequest(
            model_name="losses",
            inputs=[
                v2.ModelInferRequest.InferInputTensor(name="logits", datatype=datatype, shape=[job["rows"], job["classes"]]),
                v2.ModelInferRequest.InferInputTensor(name="labels", datatype="INT64", shape=[job["rows"]]),
            ],
            parameters={"functions": v2.InferParameter(string_param=",".join(job["functions"]))},
            raw_input_contents=[_raw(z), _raw(y)],
        )

    async def acall() -> object:
        if "s" not in holder:
            holder["s"] = v2_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(job["address"], options=options))
        return await holder["s"].ModelInfer(request(), timeout=600)

    return (lambda: stub.ModelInfer(request(), timeout=600)), acall


TARGETS = {"lossd": lossd_calls, "fastapi": fastapi_calls, "kserve": kserve_calls}


# --- scenarios ------------------------------------------------------------------------------------


def timed(fn: Call, count: int) -> list[float]:
    """Wall time of each of ``count`` calls."""
    out = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


async def concurrent(acall: Callable[[], Awaitable[object]], callers: int, seconds: float) -> dict[str, Any]:
    """``callers`` tasks calling back to back for ``seconds``; every call's latency."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await acall()
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(acall() for _ in range(callers)))  # connections up before timing
    begin = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return {"seconds": latencies, "elapsed": time.perf_counter() - begin}


def batches(job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``job["batches"]`` batches cycling through 16 distinct ones (memory stays small)."""
    pool = [logits_labels(job["rows"], job["classes"], seed) for seed in range(16)]
    for i in range(job["batches"]):
        z, y = pool[i % len(pool)]
        yield {"logits": z, "labels": y}


def lossd_run(job: dict[str, Any]) -> dict[str, Any]:
    """client.run over many batches: the time of every update."""
    from lossd.client import Client

    with Client(job["address"]) as client:
        client.evaluate(next(batches({**job, "batches": 1})), job["functions"])
        _ready()
        run = client.run(job["functions"])
        seconds = timed_each(run.update, batches(job))
        return {"seconds": seconds, "elapsed": sum(seconds), "values": {k: v.value for k, v in run.result().items()}}


def lossd_local_run(job: dict[str, Any]) -> dict[str, Any]:
    """client.run(compute="local"): every update's time, and the bytes its Finalize carried (the states: no logits)."""
    from lossd.client import Client
    from lossd.v1 import lossd_pb2 as pb

    with Client(job["address"]) as client:
        sent: list[int] = []
        finalize = client.finalize

        def counted(states: Any, **options: Any) -> Any:
            named = [pb.NamedState(alias=alias, state=state) for alias, state in states]
            sent.append(pb.FinalizeRequest(states=named, request_id=options.get("request_id") or "").ByteSize())
            return finalize(states, **options)

        client.finalize = counted  # type: ignore[method-assign]  # the run calls it once per update
        warm = client.run(job["functions"], compute="local")
        warm.update(next(batches({**job, "batches": 1})))
        sent.clear()
        _ready()
        run = client.run(job["functions"], compute="local")
        seconds = timed_each(run.update, batches(job))
        values = {k: v.value for k, v in run.result().items()}
        return {"seconds": seconds, "elapsed": sum(seconds), "values": values, "wire_bytes": sent}


def lossd_stream(job: dict[str, Any]) -> dict[str, Any]:
    """One evaluate_stream over many batches."""
    from lossd.client import Client

    with Client(job["address"]) as client:
        client.evaluate(next(batches({**job, "batches": 1})), job["functions"])
        _ready()
        start = time.perf_counter()
        result = client.evaluate_stream(batches(job), job["functions"])
        elapsed = time.perf_counter() - start
        return {"seconds": [elapsed], "elapsed": elapsed, "values": {k: v.value for k, v in result.items()}}


def lossd_auroc(job: dict[str, Any]) -> dict[str, Any]:
    """client.run with exact AUROC: the time of every update (the state grows with the batches)."""
    from lossd.client import Client

    with Client(job["address"]) as client:
        _ready()
        run = client.run(["auroc"])
        scores = ({"logits": z, "targets": t} for z, t in (binary_scores(job["rows"], seed) for seed in range(job["batches"])))
        seconds = timed_each(run.update, scores)
        return {"seconds": seconds, "elapsed": sum(seconds)}


def timed_each(update: Callable[[Any], object], items: Iterator[Any]) -> list[float]:
    """Wall time of ``update(item)`` for each item."""
    out = []
    for item in items:
        start = time.perf_counter()
        update(item)
        out.append(time.perf_counter() - start)
    return out


def _ready() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


def main() -> None:
    """Run the job given as JSON in argv[1]; print its result as JSON."""
    job = json.loads(sys.argv[1])
    scenario = job["scenario"]
    if scenario in ("run", "local", "stream", "auroc"):
        result = {"run": lossd_run, "local": lossd_local_run, "stream": lossd_stream, "auroc": lossd_auroc}[scenario](job)
    else:
        call, acall = TARGETS[job["target"]](job)
        for _ in range(job.get("warmup", 2)):
            call()
        _ready()
        if scenario == "concurrent":
            result = asyncio.run(concurrent(acall, job["callers"], job["duration"]))
        else:  # "repeat": the same call, one after another
            result = {"seconds": timed(call, job["repeats"])}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
