"""A real Prometheus scraping ``lossd serve --workers 2``: one target, the workers' counters summed, the rules exact.

The batches go over fresh gRPC channels (new connections, spread by the kernel
over both workers); Prometheus scrapes the supervisor's single /metrics and
evaluates the repo's recording rules, whose pooled ECE and mean loss must equal
one lossd request over the whole data set.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from conftest import Prometheus, wait_for
from test_prometheus import BINS, SELECTOR, TAGS, N, _dataset, _value, _whole

from helpers import require_binary
from lossd.client.codec import encode_tensor
from lossd.client.specs import spec_to_proto
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc
from tests.integration.lossd_process import LossdProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workers() -> Iterator[LossdProcess]:
    with LossdProcess(workers=2, drain_seconds=0) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(workers: LossdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    server = Prometheus(require_binary("prometheus"), tmp_path_factory.mktemp("prometheus"), [workers.url.removeprefix("http://")])
    try:
        wait_for(lambda: server.targets_up() == 1, 30, "the supervisor to be scraped")
        yield server
    finally:
        server.stop()


def test_recording_rules_over_two_workers_equal_one_request(workers: LossdProcess, prometheus: Prometheus) -> None:
    data = _dataset()
    tags = pb.Tags(**TAGS)
    functions = [spec_to_proto(f) for f in ("cross_entropy", f"ece:n_bins={BINS}")]
    for batch in np.array_split(np.arange(N), 12):
        with grpc.insecure_channel(workers.grpc_address) as channel:  # a connection of its own: either worker
            request = pb.EvaluateRequest(tensors={k: encode_tensor(v[batch], k) for k, v in data.items()}, functions=functions, tags=tags)
            pb_grpc.LossServiceStub(channel).Evaluate(request, timeout=60)
    expected = _whole(workers.grpc_address, data)

    wait_for(
        lambda: _value(prometheus, f"model_dataset_split:lossd_calibration_predictions:increase5m{SELECTOR}") == N,
        30,
        "the ECE rule to see every row of both workers",
    )
    loss_rule = f'model_dataset_split_function:lossd_loss:mean5m{SELECTOR[:-1]}, function="cross_entropy"}}'
    denominator = f'model_dataset_split_function:lossd_loss_denominator:increase5m{SELECTOR[:-1]}, function="cross_entropy"}}'
    wait_for(lambda: _value(prometheus, denominator) == N, 30, "the loss rule to see every row")
    ece = _value(prometheus, f"model_dataset_split:lossd_ece:ratio5m{SELECTOR}")
    loss = _value(prometheus, loss_rule)
    assert ece is not None and loss is not None
    assert abs(ece - expected["ece"]) <= 1e-6
    assert abs(loss - expected["cross_entropy"]) <= 1e-6
    # One series per label set, not one per worker (no pid label): dashboards need no change.
    assert len(prometheus.query(f"lossd_calibration_predictions_total{SELECTOR}")) == BINS
    assert _value(prometheus, 'lossd_workers{state="serving"}') == 2
