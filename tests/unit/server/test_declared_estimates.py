"""A small Evaluate request is estimated once, on its declared shapes: the same estimates its decoded tensors give."""

from __future__ import annotations

import torch
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from lossd.kernels.budget import estimates
from lossd.server.convert import decode_request_tensors
from lossd.server.service import declared_estimates, small_work
from lossd.server.spec_cache import SpecCache
from lossd.v1 import lossd_pb2 as pb


def _request(functions: list[pb.FunctionSpec], rows: int, classes: int) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest(functions=functions)
    request.tensors["logits"].CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[rows, classes], data=bytes(4 * rows * classes)))
    request.tensors["labels"].CopyFrom(pb.Tensor(dtype=pb.INT64, shape=[rows], data=bytes(8 * rows)))
    return request


def test_declared_estimates_are_those_of_the_decoded_tensors() -> None:
    classwise = pb.FunctionSpec(name="ece", params=json_format.ParseDict({"scope": "classwise", "n_bins": 100}, Struct()))
    request = _request([pb.FunctionSpec(name="cross_entropy"), classwise], 64, 10)
    prepared = SpecCache().prepared(request.functions)
    assert prepared is not None
    known = declared_estimates(request, prepared)
    assert known == estimates(prepared, decode_request_tensors(request.tensors, torch.device("cpu")))
    limit = sum(e.memory for _, e in known)
    # Given or made afresh, the same decision.
    assert small_work(request, prepared, limit, known) and small_work(request, prepared, limit)
    assert not small_work(request, prepared, limit - 1, known) and not small_work(request, prepared, limit - 1)


def test_no_estimates_without_validated_functions_or_with_a_negative_dim() -> None:
    request = _request([pb.FunctionSpec(name="cross_entropy")], 64, 10)
    assert declared_estimates(request, None) is None
    request.tensors["labels"].shape[:] = [-64]
    assert declared_estimates(request, SpecCache().prepared(request.functions)) is None
    assert not small_work(request, SpecCache().prepared(request.functions), 1 << 30)
