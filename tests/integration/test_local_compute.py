"""compute="local": states computed in the client with lossd.kernels, only states on the wire."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from integration.conftest import ServerThread, start_server
from integration.wire_recording import RecordingInterceptor
from sklearn.metrics import roc_auc_score

from lossd.client import AsyncClient, Client
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
