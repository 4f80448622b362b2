"""compute="local": states computed in the client with lossd.kernels, only states on the wire."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from integration.conftest import ServerThread, serving_with, start_server
from integration.wire_recording import RecordingInterceptor
from sklearn.metrics import roc_auc_score

from lossd.client import AsyncClient, Client, local_sends
from lossd.client.errors import UnavailableError
from lossd.kernels import Accumulator
from lossd.server.monitoring.events import EvaluationEvent

FUNCTIONS = ["cross_entropy", "accuracy", "ece:n_bins=15", {"name": "cross_entropy", "params": {"label_smoothing": 0.1}, "alias": "smooth"}]


def classification(seed: int, n: int = 128, k: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"logits": (rng.standard_normal((n, k)) * 2).astype(np.float32), "labels": rng.integers(0, k, n)}


def binary(seed: int, n: int = 300) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = (rng.random(n) < 0.5).astype(np.float64)
    return {"logits": rng.standard_normal(n) + targets, "targets": targets}


class Events:
    def __init__(self) -> None:
        self.seen: list[EvaluationEvent] = []

    def __call__(self, event: EvaluationEvent) -> None:
        self.seen.append(event)


@pytest.fixture(autouse=True)
def one_finalize_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests follow each batch's Finalize; coalesced sends (the default interval) are test_local_coalescing.py's."""
    monkeypatch.setattr(local_sends, "SEND_INTERVAL", 0.0)


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[ServerThread, RecordingInterceptor, Events]]:
    recorder, events = RecordingInterceptor(), Events()
    server = start_server(interceptors=[recorder], subscribers=[events])
    yield server, recorder, events
    server.stop()


def values(result: object) -> dict[str, dict[str, float]]:
    return {alias: dict(r.values) for alias, r in result.items()}  # type: ignore[attr-defined]


def test_local_values_are_the_servers_bit_for_bit(address: str) -> None:
    batches = [classification(seed) for seed in range(5)]
    with Client(address, timeout=30) as client:
        remote, local = client.run(FUNCTIONS), client.run(FUNCTIONS, compute="local")
        for batch in batches:
            assert values(remote.update(batch)) == values(local.update(batch))
        assert values(remote.result()) == values(local.result())
        assert local.batches == 5 and local.result().batches == 5
        streamed = client.evaluate_stream(iter(batches), FUNCTIONS, compute="local")
        assert values(streamed) == values(local.result()) and streamed.states() == {}
    logits = torch.from_numpy(np.concatenate([b["logits"] for b in batches])).double()
    labels = torch.from_numpy(np.concatenate([b["labels"] for b in batches]))
    assert local.result()["cross_entropy"].value == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)


def test_local_exact_auroc_sends_scores_once(recorded: tuple[ServerThread, RecordingInterceptor, Events]) -> None:
    server, recorder, _ = recorded
    batches = [binary(seed) for seed in range(6)]
    with Client(server.address, timeout=30) as client:
        remote = client.run("auroc")
        for batch in batches:
            remote.update(batch)
        local = client.run("auroc", compute="local")
        recorder.clear()
        for batch in batches:
            local.update(batch)
        assert recorder.sizes == []  # an exact state alone: nothing to merge until asked
        merged = local.result()["auroc"].value
        assert len(recorder.of("Finalize")) == 1
        assert merged == remote.result()["auroc"].value
    scores = np.concatenate([b["logits"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert local.result()["auroc"].value == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)


def test_wire_bytes_per_batch_are_under_one_percent_of_the_logits(recorded: tuple[ServerThread, RecordingInterceptor, Events]) -> None:
    server, recorder, events = recorded
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((256, 32000), dtype=np.float32)
    labels = rng.integers(0, 32000, 256)
    with Client(server.address, timeout=60) as client:
        run = client.run(["cross_entropy", "accuracy"], tags={"model": "local-compute", "dataset": "d", "split": "s"}, compute="local")
        recorder.clear()
        events.seen.clear()
        for _ in range(3):
            out = run.update({"logits": logits, "labels": labels})
        assert run.result()["cross_entropy"].value == out["cross_entropy"].value  # result() waits for the last send
        sizes = recorder.of("Finalize")
    assert recorder.of("Evaluate") == [] and len(sizes) == 3
    assert max(sizes) <= 0.01 * logits.nbytes, (sizes, logits.nbytes)
    expected = float(F.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels)))
    assert out["cross_entropy"].value == pytest.approx(expected, rel=1e-6)
    # the server sees the job: one Finalize per batch, under the run's tags
    finalizes = [e for e in events.seen if e.method == "Finalize" and e.tags.model == "local-compute"]
    assert len(finalizes) == 3


def test_async_local_run_and_stream(address: str) -> None:
    batches = [classification(seed) for seed in range(3)]

    async def main() -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        async with AsyncClient(address, timeout=30) as client:
            run = client.run(FUNCTIONS, compute="local")
            for batch in batches:
                await run.update(batch)
            await run.merge()  # waits for the last update's Finalize (run.result() cannot wait)

            async def source() -> object:
                for batch in batches:
                    yield batch

            streamed = await client.evaluate_stream(source(), FUNCTIONS, compute="local")  # type: ignore[arg-type]
            remote = await client.evaluate_stream(batches, FUNCTIONS)
            return values(run.result()), values(streamed), values(remote)

    local, streamed, remote = asyncio.run(main())
    assert local == streamed == remote


def test_unknown_compute_is_refused(address: str) -> None:
    with Client(address) as client, pytest.raises(ValueError, match="compute"):
        client.run("cross_entropy", compute="gpu")


BLOCK_KERNELS = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[:2] == ["lossd", "kernels"] or name == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Absent())
from lossd.client import Client
with Client(sys.argv[1]) as client:
    client.run("cross_entropy")  # a server run needs no kernels
    try:
        client.run("cross_entropy", compute="local")
    except ImportError as exc:
        print(exc)
"""


def test_local_without_the_kernels_says_what_to_install(address: str) -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_KERNELS, address], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install lossd-kernels" in result.stdout and "compute='local'" in result.stdout


# Functions whose responses carry every kind of output: values, denominators, tensors, a binned AUROC, a grid.
EVERY_OUTPUT = [
    "cross_entropy",
    "accuracy",
    "ece:n_bins=15",
    {"name": "auroc", "params": {"bins": 64}, "alias": "binned_auroc"},
    "reliability_diagram:n_bins=10",
    "confusion_matrix",
    "temperature",
]


def test_update_returns_the_servers_finalize_of_the_same_states_bit_for_bit(address: str) -> None:
    with Client(address, timeout=30) as client:
        sent: list[tuple[list[Any], dict[str, Any], Any]] = []
        finalize = client.finalize

        def recording(states: Any, **options: Any) -> Any:
            answer = finalize(states, **options)
            sent.append((list(states), options, answer))
            return answer

        client.finalize = recording  # type: ignore[method-assign]
        run = client.run(EVERY_OUTPUT, compute="local")
        updates = [run.update(classification(seed)) for seed in range(4)]
        run.merge()  # waits for the last send
    assert len(sent) == 4
    aliases = ["cross_entropy", "accuracy", "ece", "binned_auroc", "reliability_diagram", "confusion_matrix", "temperature"]
    for out, (_, options, answer) in zip(updates, sent, strict=True):
        assert [r.alias for r in out.response.results] == aliases and all(r.HasField("state") for r in out.response.results)
        assert out.request_id == options["request_id"] == answer.request_id
        assert list(out.response.results) == list(answer.response.results)  # values, tensors, denominators, merged states


class RefusingFinalize(grpc.aio.ServerInterceptor):
    """Refuses the Finalize calls whose index (from 0, counting every Finalize the server gets) is in ``refuse``."""

    def __init__(self) -> None:
        self.calls = 0
        self.refuse: set[int] = set()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if not details.method.endswith("/Finalize"):
            return handler
        index, self.calls = self.calls, self.calls + 1
        if index not in self.refuse:
            return handler

        async def refused(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "refused by the test")

        return grpc.unary_unary_rpc_method_handler(
            refused, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


@pytest.fixture(scope="module")
def refusing() -> Iterator[tuple[ServerThread, RefusingFinalize]]:
    yield from serving_with(RefusingFinalize())


# The run's functions, as lossd.kernels spells them: an in-process Accumulator over every batch is the reference.
WITH_EXACT = [*FUNCTIONS, "auroc"]
KERNEL_SPECS = [
    "cross_entropy",
    "accuracy",
    {"name": "ece", "params": {"n_bins": 15}},
    {"name": "cross_entropy", "params": {"label_smoothing": 0.1}, "alias": "smooth"},
    "auroc",
]


def in_process(batches: list[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    acc = Accumulator(KERNEL_SPECS)
    for batch in batches:
        acc.add(batch)
    return {alias: r.values for alias, r in acc.result().results.items()}


def test_a_refused_send_is_raised_naming_its_batch_and_resending_loses_nothing(refusing: tuple[ServerThread, RefusingFinalize]) -> None:
    server, refuser = refusing
    batches = [classification(seed) for seed in range(5)]
    with Client(server.address, timeout=30) as client:
        run = client.run(WITH_EXACT, compute="local")
        refuser.refuse = {refuser.calls + 2}  # the Finalize of batch 2
        for batch in batches[:3]:
            run.update(batch)
        with pytest.raises(UnavailableError) as info:
            run.update(batches[3])
        assert "refused by the test" in str(info.value)
        assert str(info.value).endswith("whose Finalize failed: batch 2 and later were not added; resend from batch 2")
        assert "; in batch 2 (request id '" in str(info.value)
        assert run.batches == 2
        assert values(run.result()) == in_process(batches[:2])  # back to what the server acknowledged (auroc's pieces too)
        for batch in batches[2:]:
            run.update(batch)
        assert values(run.result()) == in_process(batches)


def test_an_async_refused_send_is_raised_by_the_next_update(refusing: tuple[ServerThread, RefusingFinalize]) -> None:
    server, refuser = refusing
    batches = [classification(seed) for seed in range(4)]

    async def main() -> dict[str, dict[str, float]]:
        async with AsyncClient(server.address, timeout=30) as client:
            run = client.run(WITH_EXACT, compute="local")
            refuser.refuse = {refuser.calls + 1}  # the Finalize of batch 1
            await run.update(batches[0])
            await run.update(batches[1])
            with pytest.raises(UnavailableError, match="in batch 1 .* resend from batch 1$"):
                await run.update(batches[2])
            assert run.batches == 1
            for batch in batches[1:]:
                await run.update(batch)
            return values(await run.merge())

    assert asyncio.run(main()) == in_process(batches)


ENDS_WITHOUT_RESULT = """
import sys
import numpy as np
from lossd.client import Client
client = Client(sys.argv[1], timeout=30)
run = client.run("cross_entropy", tags={"model": "ends-without-result", "dataset": "d", "split": "s"}, compute="local")
rng = np.random.default_rng(0)
for _ in range(3):
    run.update({"logits": rng.standard_normal((64, 8)), "labels": rng.integers(0, 8, 64)})
"""


def test_a_script_that_ends_without_result_still_sends_its_last_batch(recorded: tuple[ServerThread, RecordingInterceptor, Events]) -> None:
    server, _, events = recorded
    done = subprocess.run([sys.executable, "-c", ENDS_WITHOUT_RESULT, server.address], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    finalizes = [e for e in events.seen if e.method == "Finalize" and e.tags.model == "ends-without-result"]
    # The default SEND_INTERVAL holds the later batches back; they go out at exit, in the last Finalize.
    assert 1 <= len(finalizes) <= 3 and finalizes[-1].evaluation is not None and finalizes[-1].evaluation.batches == 3


def test_closing_the_client_sends_and_waits_for_each_runs_last_batches(
    recorded: tuple[ServerThread, RecordingInterceptor, Events], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _, events = recorded
    monkeypatch.setattr(local_sends, "SEND_INTERVAL", 30.0)  # batches 1 and 2 are held back until close()
    with Client(server.address, timeout=30) as client:
        run = client.run("cross_entropy", compute="local", tags={"model": "closed-sync"})
        for seed in range(3):
            run.update(classification(seed))
    # A local run's update returns before its Finalize is sent or answered; close() sent the held one and waited.

    async def main() -> None:
        async with AsyncClient(server.address, timeout=30) as client:
            run = client.run("cross_entropy", compute="local", tags={"model": "closed-async"})
            for seed in range(3):
                await run.update(classification(seed))

    asyncio.run(main())
    for model in ("closed-sync", "closed-async"):
        finalizes = [e for e in events.seen if e.method == "Finalize" and e.tags.model == model]
        assert len(finalizes) == 2, model
        assert finalizes[-1].evaluation is not None and finalizes[-1].evaluation.batches == 3
