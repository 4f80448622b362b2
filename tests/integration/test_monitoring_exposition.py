"""The /metrics of a real replica after requests of every kind: promtool lint, names, phases, bytes, bounded handlers."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from replica import Replica

from helpers import require_binary
from lossd.client.codec import encode_tensor
from lossd.client.specs import spec_to_proto
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

RNG = np.random.default_rng(0)
KINDS: dict[str, tuple[dict[str, np.ndarray], list[Any]]] = {
    "logits2d": (
        {"logits": RNG.standard_normal((64, 10)).astype(np.float32), "labels": RNG.integers(0, 10, 64)},
        ["cross_entropy", "accuracy"],
    ),
    "mapped": (
        {"student": RNG.standard_normal((64, 10)).astype(np.float32), "gold": RNG.integers(0, 10, 64)},
        [{"name": "cross_entropy", "inputs": {"logits": "student", "labels": "gold"}}],
    ),
    "btv": ({"logits": RNG.standard_normal((2, 8, 50)).astype(np.float32), "labels": RNG.integers(0, 50, (2, 8))}, ["lm_cross_entropy"]),
    "binary": (
        {"logits": RNG.standard_normal(64).astype(np.float32), "targets": RNG.integers(0, 2, 64).astype(np.float32)},
        ["bce_with_logits", "accuracy"],
    ),
}


def _request(kind: str) -> pb.EvaluateRequest:
    tensors, functions = KINDS[kind]
    return pb.EvaluateRequest(
        tensors={k: encode_tensor(v, k) for k, v in tensors.items()},
        functions=[spec_to_proto(f) for f in functions],
        tags=pb.Tags(model=kind, dataset="d", split="s"),
        return_state=True,
    )


@pytest.fixture(scope="module")
def scraped() -> Iterator[tuple[Replica, str]]:
    """A replica after one Evaluate of each kind, a stream, a Finalize and gateway requests; its /metrics text."""
    replica = Replica().start()
    try:
        with grpc.insecure_channel(replica.grpc_address) as channel:
            stub = pb_grpc.LossServiceStub(channel)
            responses = {kind: stub.Evaluate(_request(kind), timeout=60) for kind in KINDS}
            stub.EvaluateStream(iter([_request("logits2d"), _request("logits2d")]), timeout=60)
            state = responses["logits2d"].results[0].state
            stub.Finalize(pb.FinalizeRequest(states=[pb.NamedState(alias="cross_entropy", state=state)]), timeout=60)
        with httpx.Client(base_url=replica.url, timeout=60) as http:
            http.get("/v1/functions")
            text = http.get("/metrics").text
        yield replica, text
    finally:
        replica.stop()


def test_promtool_check_metrics_finds_no_lint_problem(scraped: tuple[Replica, str]) -> None:
    _, text = scraped
    result = subprocess.run([require_binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_reserved_suffixes_only_on_histograms_and_total_only_on_counters(scraped: tuple[Replica, str]) -> None:
    """What promtool does not check: `_sum_total`-style names, `_total` on gauges, `_sum` on non-histograms."""
    _, text = scraped
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name, kind in types.items():
        assert not re.search(r"_(sum|count|bucket)(_total)?$", name), f"{kind} {name}"
        assert name.endswith("_total") == (kind == "counter"), f"{kind} {name}"
    assert {"lossd_loss_numerator_total", "lossd_metric_numerator_total", "lossd_calibration_predictions_total"} <= types.keys()
    assert types["process_cpu_seconds_total"] == "counter" and types["python_gc_collections_total"] == "counter"


def test_each_kind_exports_its_means_and_calibration(scraped: tuple[Replica, str]) -> None:
    _, text = scraped
    for kind in KINDS:
        assert f'lossd_calibration_predictions_total{{bin_upper="1.0000",dataset="d",model="{kind}",split="s"}}' in text
        rows = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("lossd_calibration_predictions_total") and f'model="{kind}"' in line
        )
        assert rows == {"btv": 2 * 7, "logits2d": 3 * 64}.get(kind, 64), kind  # tokens shifted; the stream adds 2 × 64
    assert 'lossd_metric_denominator_total{dataset="d",function="accuracy",model="binary",split="s"} 64.0' in text
    assert 'lossd_loss_denominator_total{dataset="d",function="lm_cross_entropy",model="btv",split="s"} 14.0' in text
    assert "lossd_loss_numerator_total" in text and 'lossd_loss_numerator_total{dataset="d",function="accuracy"' not in text


def test_phases_bytes_process_and_no_device_metrics_on_cpu(scraped: tuple[Replica, str]) -> None:
    replica, text = scraped
    for method, calls in (("Evaluate", 4), ("EvaluateStream", 1), ("Finalize", 1)):
        for phase in ("queue", "decode", "compute", "encode"):
            assert f'lossd_phase_duration_seconds_count{{method="{method}",phase="{phase}"}} {calls}.0' in text, (method, phase)
    assert 'lossd_phase_duration_seconds_bucket{le="2.5e-05",method="Evaluate",phase="decode"}' in text
    received = re.search(r'lossd_grpc_received_bytes_total\{grpc_method="Evaluate",grpc_service="lossd.v1.LossService"\} (\S+)', text)
    assert received is not None and float(received.group(1)) == sum(_request(kind).ByteSize() for kind in KINDS)
    assert "process_resident_memory_bytes" in text and "python_gc_objects_collected_total" in text and "python_info{" in text
    assert "lossd_cuda_" not in text  # a CPU replica has no device series at all (not zeros)


def test_http_handler_label_is_the_route_template_for_1000_raw_paths(scraped: tuple[Replica, str]) -> None:
    replica, _ = scraped
    with httpx.Client(base_url=replica.url, timeout=60) as http:
        for i in range(1000):
            http.get(f"/v1/functions/fn-{i}" if i % 2 else f"/no/such/path/{i}")
        text = http.get("/metrics").text
    handlers = set(re.findall(r'^lossd_http_requests_total\{code="\d+",handler="([^"]*)"', text, re.M))
    routes = {getattr(route, "path", "") for route in replica.app.routes}
    assert handlers <= routes | {"other"}, handlers - routes
    assert len(handlers) <= 6, handlers
    assert not any("fn-" in h or "/no/such" in h for h in handlers)
