"""Hostile wire tensors found by an audit: each is refused as INVALID_ARGUMENT naming the field, none blocks or crashes.

A FIFO under a segment's name, negative or too many dims in shared memory,
BOOL bytes other than 0 and 1, float labels past int64's range, and shared
memory where only message bytes are taken (stream messages, state fields)."""

from __future__ import annotations

import os
import threading
import uuid

import numpy as np
import pytest
import torch

from lossd.client.shared_memory import SEGMENT_DIRECTORY, SharedBatch
from lossd.kernels import evaluate
from lossd.kernels.errors import InvalidInput
from lossd.server.convert import decode_request_tensors, state_from_proto
from lossd.server.shared_memory import DISABLED_MESSAGE, ONLY_EVALUATE_MESSAGE, shared_tensor
from lossd.v1 import lossd_pb2 as pb

CPU = torch.device("cpu")
needs_shm = pytest.mark.skipif(not SEGMENT_DIRECTORY.is_dir(), reason="POSIX shared memory (/dev/shm) is Linux-only")


def _violation(call) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput) as error:
        call()
    (violation,) = error.value.violations
    return violation.field, violation.description


def _region(name: str, shape: list[int], byte_size: int, dtype: int = pb.FLOAT32) -> pb.Tensor:
    t = pb.Tensor(dtype=dtype, shape=shape)
    t.shared_memory.name, t.shared_memory.offset, t.shared_memory.byte_size = name, 0, byte_size
    return t


@needs_shm
def test_a_fifo_under_a_segment_name_is_refused_without_waiting_for_a_writer() -> None:
    name = f"lossd_fifo_{uuid.uuid4().hex}"
    path = os.path.join(str(SEGMENT_DIRECTORY), name)
    os.mkfifo(path, 0o600)
    outcome: list[tuple[str, str]] = []
    try:
        # On a thread: were the open to block (it did, before O_NONBLOCK), the test fails instead of hanging.
        worker = threading.Thread(
            target=lambda: outcome.append(_violation(lambda: shared_tensor(_region(name, [2, 2], 16), "tensors.logits", allowed=True))),
            daemon=True,
        )
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "opening a FIFO named like a segment blocked"
    finally:
        os.unlink(path)
    assert outcome == [("tensors.logits.shared_memory.name", f"expected a shared-memory segment, got {name!r} which is not one")]


@needs_shm
@pytest.mark.parametrize(
    ("shape", "byte_size", "description"),
    [
        ([-1, -1], 4, "expected dimensions in [0, 2^31 - 1], got -1 in shape of 2 dimensions"),
        ([-8, -4], 128, "expected dimensions in [0, 2^31 - 1], got -8 in shape of 2 dimensions"),
        ([1] * 70, 4, "expected at most 32 dimensions, got 70"),
    ],
)
def test_shared_memory_shapes_are_checked_as_message_shapes(shape: list[int], byte_size: int, description: str) -> None:
    with SharedBatch({"logits": np.zeros(32, np.float32)}) as segment:
        name = segment.tensors["logits"].shared_memory.name
        got = _violation(lambda: shared_tensor(_region(name, shape, byte_size), "tensors.logits", allowed=True))
    assert got == ("tensors.logits", description)


@pytest.mark.parametrize("byte", [2, 255])
def test_bool_bytes_other_than_0_and_1_are_refused(byte: int) -> None:
    t = pb.Tensor(dtype=pb.BOOL, shape=[4], data=bytes([1, byte, 1, 0]))
    got = _violation(lambda: decode_request_tensors({"targets": t}, CPU))
    assert got == ("tensors.targets", f"expected BOOL bytes 0 or 1, got {byte} at flat index 1")


@needs_shm
def test_bool_bytes_in_shared_memory_are_checked_too() -> None:
    with SharedBatch({"targets": np.frombuffer(bytes([0, 1, 7, 1]), np.uint8)}) as segment:
        region = segment.tensors["targets"]
        region.dtype = pb.BOOL
        got = _violation(lambda: shared_tensor(region, "tensors.targets", allowed=True))
    assert got == ("tensors.targets", "expected BOOL bytes 0 or 1, got 7 at flat index 2")


def test_clean_bool_bytes_still_decode() -> None:
    t = pb.Tensor(dtype=pb.BOOL, shape=[2, 2], data=bytes([1, 0, 0, 1]))
    assert decode_request_tensors({"m": t}, CPU)["m"].tolist() == [[True, False], [False, True]]


def test_a_float_label_past_int64_is_quoted_as_sent() -> None:
    logits, labels = torch.zeros(4, 3), torch.tensor([0.0, 1e20, 2.0, 0.0], dtype=torch.float64)
    got = _violation(lambda: evaluate({"logits": logits, "labels": labels}, ["cross_entropy"]))
    assert got == ("tensors.labels", "cross_entropy: expected class indices, got 1e+20 at flat index 1")


def test_shared_memory_off_names_the_setting() -> None:
    got = _violation(lambda: decode_request_tensors({"x": _region("lossd_x", [1], 4)}, CPU, allow_shared_memory=False))
    assert got == ("tensors.x.shared_memory", DISABLED_MESSAGE)


def test_shared_memory_in_a_stream_message_says_it_is_taken_only_in_evaluate() -> None:
    # A stream decodes with allow_shared_memory=None whatever the server's setting: "start it with ..." would mislead.
    got = _violation(lambda: decode_request_tensors({"x": _region("lossd_x", [1], 4)}, CPU))
    assert got == ("tensors.x.shared_memory", ONLY_EVALUATE_MESSAGE)


def test_shared_memory_in_a_state_field_is_refused_not_read_as_empty_bytes() -> None:
    state = pb.State(function="cross_entropy", version=1, batches=1)
    state.fields["sum_loss"].CopyFrom(_region("lossd_x", [], 8, pb.FLOAT64))
    got = _violation(lambda: state_from_proto(state, "states[0].state"))
    assert got == ("states[0].state.fields.sum_loss.shared_memory", ONLY_EVALUATE_MESSAGE)
