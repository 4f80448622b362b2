"""compute="local" raises the server's InvalidArgumentError; a run's refusal names the batch and keeps the other details."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from lossd.client.errors import FieldViolation, InvalidArgumentError, invalid_argument, naming_batch
from lossd.client.local import LocalStates
from lossd.client.messages import batch_label
from lossd.client.specs import spec_to_proto
from lossd.v1 import lossd_pb2 as pb


def test_naming_batch_adds_the_batch_to_every_violation_and_keeps_other_details() -> None:
    diagnostic = any_pb2.Any()
    diagnostic.Pack(pb.Diagnostic(code="nan_or_inf", message="1 NaN"))
    error = invalid_argument([("tensors.a", "bad"), ("tensors.b", "worse")], [diagnostic])
    named = naming_batch(error, batch_label(3, "b3", "r" * 100))
    suffix = f"; in batch 3 (batch_id 'b3', request id '{'r' * 64}')"
    assert named.violations == [FieldViolation("tensors.a", "bad" + suffix), FieldViolation("tensors.b", "worse" + suffix)]
    assert str(named) == f"INVALID_ARGUMENT: tensors.a: bad{suffix}; tensors.b: worse{suffix}"
    assert named.status is not None and [d.Is(error_details_pb2.BadRequest.DESCRIPTOR) for d in named.status.details] == [True, False]
    assert named.details(pb.Diagnostic)[0].code == "nan_or_inf"


def test_local_bad_input_is_the_clients_invalid_argument_with_its_diagnostics() -> None:
    local = LocalStates([spec_to_proto("cross_entropy")], nan_policy="raise")
    logits = np.zeros((4, 3))
    logits[2, 1] = np.inf
    with pytest.raises(InvalidArgumentError) as info:
        local.evaluate({"logits": logits, "labels": np.zeros(4, dtype=np.int64)})
    (violation,) = info.value.violations
    assert violation.field == "tensors.logits"
    assert violation.description.startswith("holds inf at flat index 7 (row 2); nan_policy='raise'")
    assert [d.code for d in info.value.details(pb.Diagnostic)] == ["nan_or_inf"]
