"""The Python client against a real server: sync and asyncio, runs, finalize, deadlines, retries."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from integration.conftest import ServerThread
from integration.wire_recording import MethodRecorder

from helpers import assert_close, tol
from lossd.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    EvaluationResult,
    InvalidArgumentError,
    UnavailableError,
)
from lossd.client import core as core_module
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

N, K = 64, 10


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Client]:
    with Client(address, timeout=30) as c:
        yield c


@pytest.fixture
def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"logits": (rng.standard_normal((N, K)) * 2).astype(np.float32), "labels": rng.integers(0, K, N)}


def reference_ce(logits: np.ndarray | torch.Tensor, labels: np.ndarray, **kwargs: object) -> float:
    z = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(logits)
    return float(F.cross_entropy(z.double(), torch.from_numpy(labels), **kwargs))  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_evaluate_matches_torch(client: Client, batch: dict) -> None:
    out = client.evaluate(batch, ["cross_entropy", {"name": "cross_entropy", "params": {"label_smoothing": 0.2}, "alias": "smooth"}])
    assert isinstance(out, EvaluationResult) and list(out) == ["cross_entropy", "smooth"]
    assert_close(out["cross_entropy"].value, reference_ce(batch["logits"], batch["labels"]), rtol=1e-6, what="cross_entropy")
    assert_close(out["smooth"].value, reference_ce(batch["logits"], batch["labels"], label_smoothing=0.2), rtol=1e-6, what="smoothed")
    assert out["cross_entropy"].denominator == N and out["cross_entropy"].denominator_kind
    assert out["cross_entropy"].state is None and out.states() == {}


def test_torch_bfloat16_and_nested_list_inputs(client: Client, batch: dict) -> None:
    logits = torch.from_numpy(batch["logits"]).to(torch.bfloat16)
    out = client.evaluate({"logits": logits, "labels": torch.from_numpy(batch["labels"])}, "cross_entropy")
    assert_close(out["cross_entropy"].value, reference_ce(logits.float(), batch["labels"]), rtol=1e-6, what="bf16 cross_entropy")
    listed = client.evaluate({"logits": batch["logits"].tolist(), "labels": batch["labels"].tolist()}, "cross_entropy")
    assert_close(
        listed["cross_entropy"].value, reference_ce(batch["logits"].astype(np.float64), batch["labels"]), rtol=1e-6, what="nested lists"
    )


def test_tags_request_id_and_to_json(client: Client, batch: dict) -> None:
    out = client.evaluate(batch, "cross_entropy", tags={"model": "m", "dataset": "d", "split": "s"}, request_id="abc123")
    assert out.request_id == "abc123" and out.batches == 1
    assert out.to_json() == {"results": {"cross_entropy": out["cross_entropy"].value}, "diagnostics": []}


def test_reduction_none_returns_a_tensor(client: Client, batch: dict) -> None:
    out = client.evaluate(batch, "cross_entropy:reduction=none")
    per = out["cross_entropy"].tensors["value"]
    expected = F.cross_entropy(torch.from_numpy(batch["logits"]).double(), torch.from_numpy(batch["labels"]), reduction="none").numpy()
    assert_close(per, expected, **tol(torch.float32), what="per-sample losses (float32)")
    with pytest.raises(ValueError, match="returned a tensor"):
        _ = out["cross_entropy"].value


def test_return_state_and_finalize(client: Client, batch: dict) -> None:
    a = client.evaluate({k: v[:20] for k, v in batch.items()}, "cross_entropy", return_state=True)
    b = client.evaluate({k: v[20:] for k, v in batch.items()}, "cross_entropy", return_state=True)
    state = a["cross_entropy"].state
    assert state is not None and state.function == "cross_entropy" and state.fields
    merged = client.finalize([a.states(), b.states()], return_state=True)
    assert_close(merged["cross_entropy"].value, reference_ce(batch["logits"], batch["labels"]), rtol=1e-6, what="finalized")
    assert merged["cross_entropy"].state is not None


def test_list_functions(client: Client) -> None:
    catalogue = client.list_functions()
    names = {f.name for f in catalogue.functions}
    assert "cross_entropy" in names and catalogue.diagnostics
    ce = next(f for f in catalogue.functions if f.name == "cross_entropy")
    assert ce.splittable and {r.name for r in ce.roles} >= {"logits", "labels"} and "label_smoothing" in {p.name for p in ce.params}
    assert {f.family for f in client.list_functions("classification").functions} == {"classification"}


def test_run_keeps_states_on_failure(client: Client, batch: dict) -> None:
    first, second = {k: v[:30] for k, v in batch.items()}, {k: v[30:] for k, v in batch.items()}
    run = client.run("cross_entropy")
    with pytest.raises(ValueError, match="at least one update"):
        run.result()
    run.update(first)
    before = run.states()
    bad = {**second, "labels": second["labels"] + K}
    with pytest.raises(InvalidArgumentError):
        run.update(bad)
    assert run.states() == before and run.batches == 1  # the failed batch left no trace
    out = run.update(second)
    assert run.batches == 2 and out.batches == 2
    assert_close(run.result()["cross_entropy"].value, reference_ce(batch["logits"], batch["labels"]), rtol=1e-6, what="run")


def test_run_refuses_reduction_none(client: Client, batch: dict) -> None:
    # Refused before anything is sent: no batch is evaluated (or monitored) for nothing.
    with pytest.raises(ValueError, match="reduction='none'"):
        client.run("cross_entropy:reduction=none")


def test_run_accumulates_diagnostics(client: Client, batch: dict) -> None:
    probs = torch.softmax(torch.from_numpy(batch["logits"]), dim=1).numpy()  # probabilities sent as logits
    run = client.run("cross_entropy")
    for _ in range(3):
        run.update({"logits": probs, "labels": batch["labels"]})
    diagnostics = run.result().diagnostics
    assert diagnostics, "expected a diagnostic for probabilities sent as logits"
    assert all(d.count == 3 for d in diagnostics)


def test_stream_reraises_the_callers_error(client: Client, batch: dict) -> None:
    def batches() -> Iterator[dict]:
        yield batch
        raise KeyError("loader broke")

    with pytest.raises(KeyError, match="loader broke"):
        client.evaluate_stream(batches(), "cross_entropy")


def test_stream_splits_only_splittable_functions(address: str, batch: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    splits: list[int] = []
    original = core_module.split_rows
    monkeypatch.setattr(core_module, "split_rows", lambda arrays, max_bytes: splits.append(1) or original(arrays, max_bytes))
    listed: list[int] = []
    with Client(address, timeout=30, chunk_bytes=256) as c:
        original_list = c.list_functions
        monkeypatch.setattr(c, "list_functions", lambda *a, **k: listed.append(1) or original_list(*a, **k))
        out = c.evaluate_stream([batch, batch], "cross_entropy")
        assert_close(out["cross_entropy"].value, reference_ce(batch["logits"], batch["labels"]), rtol=1e-6, what="chunked")
        assert splits == [1, 1]
        # nt_xent's value depends on the whole batch: never split, so the server accepts it
        emb = {"embeddings": np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32), "labels": np.arange(32) % 4}
        c.evaluate_stream([emb], "nt_xent")
        assert splits == [1, 1]
        assert listed == [1]  # the catalogue is fetched once and cached


def _slow_batch() -> dict:
    """A batch that takes well over a millisecond to send and evaluate (a tiny one may beat any deadline)."""
    rng = np.random.default_rng(0)
    return {"logits": rng.standard_normal((4000, 1000), dtype=np.float32), "labels": rng.integers(0, 1000, 4000)}


def test_deadline_exceeded(client: Client, batch: dict) -> None:
    with pytest.raises(DeadlineExceededError) as info:
        client.evaluate(_slow_batch(), "cross_entropy", timeout=1e-3)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value.__cause__, grpc.RpcError)


def test_bad_timeout(client: Client, batch: dict) -> None:
    with pytest.raises(ValueError, match="expected timeout > 0"):
        client.evaluate(batch, "cross_entropy", timeout=0)
    with pytest.raises(ValueError, match="expected a server address"):
        Client("")


def test_unavailable() -> None:
    with Client(f"127.0.0.1:{free_port()}", timeout=10, attempts=1) as c:
        with pytest.raises(UnavailableError):
            c.list_functions()


class FlakyService(pb_grpc.LossServiceServicer):
    """Answers UNAVAILABLE to the first ``failures`` calls, then a fixed result."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.lock = threading.Lock()

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.failures
        if fail:  # marked retryable: an unmarked UNAVAILABLE may come from a handler that did the work
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "0"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return pb.EvaluateResponse(
            results=[pb.FunctionResult(alias="x", function="x", values={"value": 1.0})], request_id=request.request_id
        )


@pytest.mark.parametrize(("attempts", "failures", "succeeds"), [(5, 2, True), (1, 1, False), (2, 2, False)])
def test_retries_on_unavailable(attempts: int, failures: int, succeeds: bool) -> None:
    service = FlakyService(failures)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_LossServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10, attempts=attempts) as c:
            if succeeds:
                assert c.evaluate({"x": [1.0]}, "x")["x"].value == 1.0
                assert service.calls == failures + 1
            else:
                with pytest.raises(UnavailableError, match="draining"):
                    c.evaluate({"x": [1.0]}, "x")
                assert service.calls == attempts
    finally:
        server.stop(None)


def test_async_client(address: str, batch: dict) -> None:
    parts = [{k: v[s] for k, v in batch.items()} for s in (slice(0, 10), slice(10, 41), slice(41, N))]
    expected = reference_ce(batch["logits"], batch["labels"])

    async def main() -> None:
        async with AsyncClient(address, timeout=30) as c:
            out = await c.evaluate(batch, "cross_entropy", return_state=True)
            assert_close(out["cross_entropy"].value, expected, rtol=1e-6, what="async evaluate")

            async def batches() -> AsyncIterator[dict]:
                for p in parts:
                    yield p

            streamed = await c.evaluate_stream(batches(), "cross_entropy")
            assert streamed.batches == 3
            assert_close(streamed["cross_entropy"].value, expected, rtol=1e-6, what="async stream")
            assert_close(
                (await c.evaluate_stream(parts, "cross_entropy"))["cross_entropy"].value,
                expected,
                rtol=1e-6,
                what="async stream (sync iterable)",
            )

            run = c.run("cross_entropy")
            for p in parts:
                await run.update(p)
            assert_close(run.result()["cross_entropy"].value, expected, rtol=1e-6, what="async run")
            finalized = await c.finalize(run.states())
            assert_close(finalized["cross_entropy"].value, expected, rtol=1e-6, what="async finalize")

            assert "cross_entropy" in {f.name for f in (await c.list_functions()).functions}
            with pytest.raises(InvalidArgumentError) as info:
                await c.evaluate(batch, "cross_entropy:label_smoothing=3")
            assert info.value.violations[0].field == "functions[0].params.label_smoothing"
            with pytest.raises(InvalidArgumentError, match="reduction"):
                await c.evaluate_stream(parts, "cross_entropy:reduction=none")
            with pytest.raises(DeadlineExceededError):
                await c.evaluate(_slow_batch(), "cross_entropy", timeout=1e-3)

            async def broken() -> AsyncIterator[dict]:
                yield parts[0]
                raise KeyError("loader broke")

            with pytest.raises(KeyError, match="loader broke"):
                await c.evaluate_stream(broken(), "cross_entropy")

            async with AsyncClient(address, timeout=30, chunk_bytes=256) as chunky:
                chunked = await chunky.evaluate_stream(parts, "cross_entropy")
                assert_close(chunked["cross_entropy"].value, expected, rtol=1e-6, what="async chunked stream")

    asyncio.run(main())


# -- the two clients share one core: split decision and families -------------------------------


def embeddings() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "embeddings": rng.standard_normal((32, 8)).astype(np.float32),
        "labels": np.arange(32) % 4,
        "logits": rng.standard_normal((32, 4)).astype(np.float32),  # for a splittable function beside nt_xent
    }


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_large_batch_is_split_only_when_every_function_is_splittable(
    recorded: tuple[ServerThread, MethodRecorder], batch: dict, kind: str
) -> None:
    server, recorder = recorded
    emb = embeddings()
    nt_only = {name: t for name, t in emb.items() if name != "logits"}  # a tensor no function reads is refused
    with Client(server.address, chunk_bytes=None) as whole:
        expected_nt_xent = whole.evaluate(nt_only, "nt_xent")["nt_xent"].value
    recorder.methods.clear()

    async def evaluate_all() -> tuple[float, float, float]:
        if kind == "sync":
            with Client(server.address, timeout=30, chunk_bytes=256) as c:
                return (
                    c.evaluate(nt_only, "nt_xent")["nt_xent"].value,
                    c.evaluate(batch, "cross_entropy")["cross_entropy"].value,
                    c.evaluate(emb, ["nt_xent", "accuracy"])["nt_xent"].value,
                )
        async with AsyncClient(server.address, timeout=30, chunk_bytes=256) as a:
            return (
                (await a.evaluate(nt_only, "nt_xent"))["nt_xent"].value,
                (await a.evaluate(batch, "cross_entropy"))["cross_entropy"].value,
                (await a.evaluate(emb, ["nt_xent", "accuracy"]))["nt_xent"].value,
            )

    nt_xent, ce, mixed = asyncio.run(evaluate_all())
    # nt_xent depends on the whole batch: sent whole (unary), never in parts; cross_entropy goes in parts
    assert recorder.methods == ["ListFunctions", "Evaluate", "EvaluateStream", "Evaluate"], recorder.methods
    assert nt_xent == mixed == expected_nt_xent
    assert_close(ce, reference_ce(batch["logits"], batch["labels"]), rtol=1e-6, what=f"{kind} chunked cross_entropy")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_list_functions_honours_family(recorded: tuple[ServerThread, MethodRecorder], batch: dict, kind: str) -> None:
    server, recorder = recorded

    async def catalogues() -> tuple[pb.ListFunctionsResponse, pb.ListFunctionsResponse, float]:
        if kind == "sync":
            with Client(server.address, timeout=30, chunk_bytes=256) as c:
                regression = c.list_functions("regression")
                return regression, c.list_functions(), c.evaluate(batch, "cross_entropy")["cross_entropy"].value
        async with AsyncClient(server.address, timeout=30, chunk_bytes=256) as a:
            regression = await a.list_functions("regression")
            everything = await a.list_functions()
            return regression, everything, (await a.evaluate(batch, "cross_entropy"))["cross_entropy"].value

    recorder.methods.clear()
    regression, everything, ce = asyncio.run(catalogues())
    names = {f.name for f in regression.functions}
    assert names and {f.family for f in regression.functions} == {"regression"}
    assert names < {f.name for f in everything.functions} and "cross_entropy" not in names
    # the full catalogue (not the family's) decided the split: cross_entropy went in parts
    assert recorder.methods == ["ListFunctions", "ListFunctions", "EvaluateStream"], recorder.methods
    assert_close(ce, reference_ce(batch["logits"], batch["labels"]), rtol=1e-6, what=f"{kind} cross_entropy after a family")


def test_a_family_catalogue_does_not_decide_the_split(recorded: tuple[ServerThread, MethodRecorder], batch: dict) -> None:
    """A family's catalogue lacks the other functions: it must not be cached as the splittability of all of them."""
    server, recorder = recorded

    async def main() -> None:
        async with AsyncClient(server.address, timeout=30, chunk_bytes=256) as a:
            await a.list_functions("regression")
            await a.evaluate(batch, "cross_entropy")

    recorder.methods.clear()
    asyncio.run(main())
    assert recorder.methods == ["ListFunctions", "ListFunctions", "EvaluateStream"], recorder.methods
