"""Small Evaluate work (by bytes and by memory estimate) runs on the event loop; the rest, and anything not marked inline, on a compute thread."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from lossd.kernels.cancellation import DeadlineExceeded, check_cancelled
from lossd.server.admission import Admission, AdmissionLimits
from lossd.server.allocator import torch_threads_for
from lossd.server.service import small_work
from lossd.server.spec_cache import SpecCache
from lossd.v1 import lossd_pb2 as pb


def where(admission: Admission, *, nbytes: int, inline: bool) -> str:
    async def main() -> str:
        loop_thread = threading.current_thread().name
        name = await admission.run(lambda: threading.current_thread().name, nbytes=nbytes, inline=inline)
        return "loop" if name == loop_thread else name

    return asyncio.run(main())


def test_work_under_the_threshold_runs_on_the_loop_only_when_inline() -> None:
    admission = Admission(AdmissionLimits(inline_request_bytes=1024))
    try:
        assert where(admission, nbytes=1023, inline=True) == "loop"
        assert where(admission, nbytes=1024, inline=True).startswith("lossd-compute")
        assert where(admission, nbytes=10, inline=False).startswith("lossd-compute")  # e.g. a stream's finalize
    finally:
        admission.close()


def test_zero_threshold_never_runs_on_the_loop() -> None:
    admission = Admission(AdmissionLimits(inline_request_bytes=0))
    try:
        assert where(admission, nbytes=0, inline=True).startswith("lossd-compute")
    finally:
        admission.close()


def test_inline_work_keeps_its_deadline() -> None:
    admission = Admission(AdmissionLimits(inline_request_bytes=1024))
    seen: list[bool] = []

    def fn() -> None:
        seen.append(True)

    async def past_deadline() -> None:
        await admission.run(fn, nbytes=1, deadline=time.monotonic() - 1, inline=True)

    async def checked() -> None:
        # the kernels' chunk checks see the call's token while it runs inline
        await admission.run(lambda: (time.sleep(0.02), check_cancelled()), nbytes=1, deadline=time.monotonic() + 0.01, inline=True)

    try:
        with pytest.raises(DeadlineExceeded):
            asyncio.run(past_deadline())
        assert seen == []  # never started
        with pytest.raises(DeadlineExceeded):
            asyncio.run(checked())
    finally:
        admission.close()


@pytest.mark.parametrize(
    ("compute_threads", "cores", "configured", "expected"),
    [(2, 2, None, 1), (1, 2, None, 2), (2, 16, None, 8), (4, 2, None, 1), (3, 16, None, 5), (2, 2, 3, 3)],
)
def test_torch_threads_never_oversubscribe_the_cores(compute_threads: int, cores: int, configured: int | None, expected: int) -> None:
    assert torch_threads_for(compute_threads, cores, configured) == expected


def test_set_torch_threads_in_a_fresh_process() -> None:
    # A subprocess: the thread count is process-wide and must not change the test session's torch.
    code = (
        "import torch; from lossd.server.allocator import available_cores, set_torch_threads;"
        "n = set_torch_threads(2); print(n, torch.get_num_threads(), available_cores())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    n, actual, cores = map(int, out)
    assert n == actual == max(1, cores // 2)


def _request(functions: list[pb.FunctionSpec], rows: int, classes: int) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest(functions=functions)
    request.tensors["logits"].CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[rows, classes], data=bytes(4 * rows * classes)))
    request.tensors["labels"].CopyFrom(pb.Tensor(dtype=pb.INT64, shape=[rows], data=bytes(8 * rows)))
    return request


def _small(request: pb.EvaluateRequest, limit: int) -> bool:
    return small_work(request, SpecCache().prepared(request.functions), limit)


def test_only_work_with_a_small_memory_estimate_counts_as_small() -> None:
    limit = 4 << 20
    assert _small(_request([pb.FunctionSpec(name="cross_entropy")], 64, 10), limit)
    # 4 KiB of logits, but 1,000 classes x 1,000 bins of classwise calibration: a compute thread's work
    classwise = pb.FunctionSpec(name="ece", params=json_format.ParseDict({"scope": "classwise", "n_bins": 1000}, Struct()))
    assert not _small(_request([classwise], 1, 1000), limit)
    negative = _request([pb.FunctionSpec(name="cross_entropy")], 64, 10)
    negative.tensors["logits"].shape[:] = [-64, 10]
    assert not _small(negative, limit)  # refused when decoded, never estimated smaller than it is
    assert _small(_request([pb.FunctionSpec(name="no_such_function")], 64, 10), limit)  # refused at once
