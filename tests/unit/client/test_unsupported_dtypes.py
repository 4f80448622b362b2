"""Tensors of a dtype lossd does not carry: a TensorError naming the tensor, the dtypes it carries and the cast to make.

On every path a batch takes: encoding, the arrays of a request (unary, streams,
runs), the zero-copy serializer, compute="local", and the client's own calls,
which refuse before anything is sent.  torch's ``Tensor.numpy()`` would raise a
bare TypeError for float8 or quantized tensors, naming neither the tensor nor a fix.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from lossd.client import Client, TensorError
from lossd.client.codec import DTYPE_NAMES, encode_tensor, to_numpy
from lossd.client.local import LocalStates
from lossd.client.messages import arrays_of
from lossd.client.specs import spec_to_proto
from lossd.client.wire import serialize_evaluate_request
from lossd.v1 import lossd_pb2 as pb

CARRIED = ", ".join(DTYPE_NAMES)


def quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # quantized tensor creation is deprecated in recent torch
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.zeros(4, 3), 0.1, 0, torch.qint8)


# (tensor, the dtype as the message names it, the cast it suggests)
TORCH_CASES: dict[str, tuple[Callable[[], torch.Tensor], str, str]] = {
    "float8_e4m3fn": (
        lambda: torch.zeros(4, 3).to(torch.float8_e4m3fn),
        "torch.float8_e4m3fn",
        "cast it to float32 first (.to(torch.float32))",
    ),
    "float8_e5m2": (lambda: torch.zeros(4, 3).to(torch.float8_e5m2), "torch.float8_e5m2", "cast it to float32 first (.to(torch.float32))"),
    "complex64": (
        lambda: torch.zeros(4, 3, dtype=torch.complex64),
        "torch.complex64",
        "cast it to float32 first (.real.to(torch.float32))",
    ),
    "complex128": (lambda: torch.zeros(4, 3, dtype=torch.complex128), "torch.complex128", "(.real.to(torch.float32))"),
    "uint16": (
        lambda: torch.zeros(4, dtype=torch.uint16),
        "torch.uint16",
        "cast it to int64 (labels, indices) or float32 (values) first (.to(torch.int64))",
    ),
    "uint32": (lambda: torch.zeros(4, dtype=torch.uint32), "torch.uint32", "(.to(torch.int64))"),
    "int16": (lambda: torch.zeros(4, dtype=torch.int16), "torch.int16", "(.to(torch.int64))"),
    "int8": (lambda: torch.zeros(4, dtype=torch.int8), "torch.int8", "(.to(torch.int64))"),
    "qint8": (quantized, "torch.qint8", "dequantize it to float32 first (.dequantize())"),
}
NUMPY_CASES: dict[str, tuple[Callable[[], np.ndarray], str, str]] = {
    "complex64": (lambda: np.zeros((4, 3), np.complex64), "complex64", "cast it to float32 first (.real.astype(np.float32))"),
    "complex128": (lambda: np.zeros((4, 3), np.complex128), "complex128", "(.real.astype(np.float32))"),
    "object": (lambda: np.array([1.0, None, 2.0], dtype=object), "object", "convert it to numbers first: float32 for scores"),
    "str": (lambda: np.array(["cat", "dog"]), "str96", "convert it to numbers first"),
    "uint16": (lambda: np.zeros(4, np.uint16), "uint16", "(.astype(np.int64))"),
    "int8": (lambda: np.zeros(4, np.int8), "int8", "(.astype(np.int64))"),
    "float8_e4m3fn": (lambda: np.zeros(4, ml_dtypes.float8_e4m3fn), "float8_e4m3fn", "cast it to float32 first (.astype(np.float32))"),
    "int4": (lambda: np.zeros(4, ml_dtypes.int4), "int4", "(.astype(np.int64))"),
    "datetime": (lambda: np.zeros(4, "datetime64[s]"), "datetime64[s]", "convert it to numbers first"),
}
CASES = {**{f"torch-{k}": v for k, v in TORCH_CASES.items()}, **{f"numpy-{k}": v for k, v in NUMPY_CASES.items()}}


def expect_refusal(call: Callable[[], Any], name: str, dtype: str, cast: str) -> None:
    with pytest.raises(TensorError) as info:
        call()
    err = info.value
    assert err.field == f"tensors.{name}"
    assert err.description.startswith(f"unsupported dtype {dtype}; lossd carries {CARRIED}: "), err.description
    assert cast in err.description, err.description
    assert str(err).startswith(f"tensors.{name}: unsupported dtype {dtype};")


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_tensor_and_to_numpy_refuse_naming_tensor_dtypes_and_cast(case: str) -> None:
    make, dtype, cast = CASES[case]
    expect_refusal(lambda: encode_tensor(make(), "scores"), "scores", dtype, cast)
    expect_refusal(lambda: to_numpy(make(), "scores"), "scores", dtype, cast)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_arrays_of_a_request_refuse_before_serializing(case: str) -> None:
    make, dtype, cast = CASES[case]
    tensors = {"logits": np.zeros((4, 3), np.float32), "labels": make()}
    expect_refusal(lambda: arrays_of(tensors), "labels", dtype, cast)


def test_the_zero_copy_serializer_refuses_an_unsupported_array() -> None:
    arrays = {"logits": np.zeros((4, 3), np.complex64)}
    expect_refusal(lambda: serialize_evaluate_request(arrays, pb.EvaluateRequest()), "logits", "complex64", "(.real.astype(np.float32))")


@pytest.mark.parametrize(
    "case", ["torch-float8_e4m3fn", "torch-complex64", "torch-uint16", "numpy-complex64", "numpy-object", "numpy-int8"]
)
def test_compute_local_refuses_as_the_server_would(case: str) -> None:
    """Local states go through the kernels, which read int8 or uint16 labels as the wire never would: refused first, alike."""
    make, dtype, cast = CASES[case]
    local = LocalStates([spec_to_proto("accuracy")])
    expect_refusal(lambda: local.evaluate({"logits": make(), "labels": np.arange(4) % 3}), "logits", dtype, cast)


def test_client_calls_refuse_before_sending() -> None:
    z, y = torch.randn(4, 3), torch.arange(4) % 3
    with Client("127.0.0.1:1", timeout=1) as offline:  # nothing listens: the refusal must come first
        expect_refusal(
            lambda: offline.evaluate({"logits": z.to(torch.float8_e4m3fn), "labels": y}, "cross_entropy"),
            "logits",
            "torch.float8_e4m3fn",
            "(.to(torch.float32))",
        )
        run = offline.run(["cross_entropy"], compute="local")
        expect_refusal(lambda: run.update({"logits": z, "labels": y.to(torch.uint16)}), "labels", "torch.uint16", "(.to(torch.int64))")
        batches = iter([{"logits": z.numpy().astype(np.complex64), "labels": y}])
        expect_refusal(lambda: offline.evaluate_stream(batches, ["cross_entropy"], compute="local"), "logits", "complex64", ".real")


@pytest.mark.parametrize("value", [torch.zeros(3).to_sparse(), torch.zeros(3, device="meta")], ids=["sparse", "meta"])
def test_torch_tensors_without_dense_bytes_are_a_tensor_error(value: torch.Tensor) -> None:
    with pytest.raises(TensorError, match=r"^tensors\.t: cannot read the torch tensor as a dense array \(") as info:
        encode_tensor(value, "t")
    assert info.value.field == "tensors.t"


@pytest.mark.parametrize("name", list(DTYPE_NAMES))
def test_every_carried_torch_dtype_still_converts(name: str) -> None:
    t = torch.zeros(2, 3, dtype=getattr(torch, name))
    assert to_numpy(t, "t").shape == (2, 3)
    assert encode_tensor(t, "t").dtype == DTYPE_NAMES[name]


def test_the_message_lists_every_carried_dtype() -> None:
    with pytest.raises(TensorError, match=re.escape(f"lossd carries {CARRIED}:")):
        encode_tensor(np.zeros(2, np.uint64), "x")
