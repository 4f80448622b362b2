"""Decoding wire tensors: zero-copy views of the message's bytes, values and errors as the codec's."""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import torch

from lossd.client.codec import encode_tensor
from lossd.kernels.errors import InvalidInput
from lossd.server.convert import decode_request_tensors
from lossd.v1 import lossd_pb2 as pb

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "int32", "uint8", "bool"])
def test_decoded_values_equal_the_sent_array(dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((5, 7)) * 10).astype(dtype)
    out = decode_request_tensors({"x": encode_tensor(array, "x")}, CPU)["x"]
    assert out.dtype == getattr(torch, dtype)
    assert out.shape == (5, 7)
    np.testing.assert_array_equal(out.numpy(), array)


def test_bfloat16_is_viewed_not_converted() -> None:
    array = np.array([[1.5, -2.25, 3e38], [0.0, -0.0, np.inf]], dtype=ml_dtypes.bfloat16)
    message = encode_tensor(array, "x")
    out = decode_request_tensors({"x": message}, CPU)["x"]
    assert out.dtype == torch.bfloat16
    expected = torch.tensor(array.astype(np.float32)).to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))  # bit for bit


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)])
def test_decoding_copies_the_bytes_once(dtype: np.dtype) -> None:
    """No copy after protobuf's own (reading ``data``): peak allocation stays near the payload (bf16 used to copy)."""
    payload = 8 << 20
    request = pb.EvaluateRequest(tensors={"x": encode_tensor(np.ones(payload // dtype.itemsize, dtype=dtype), "x")})
    tracemalloc.start()
    try:
        out = decode_request_tensors(request.tensors, CPU)["x"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.float().sum().item() == payload // dtype.itemsize
    assert payload <= peak < 1.25 * payload  # reading data twice, or copying the view, would be 2x


def test_byte_length_mismatch_names_the_tensor() -> None:
    bad = pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(InvalidInput) as info:
        decode_request_tensors({"logits": bad}, CPU)
    assert "tensors.logits" in str(info.value)
    assert "byte length 20 does not match dtype float32 × shape [2, 3] (expected 24 bytes)" in str(info.value)


def test_unknown_dtype_is_refused() -> None:
    bad = pb.Tensor(dtype=99, shape=[1], data=b"\0")
    with pytest.raises(InvalidInput, match=r"tensors\.x.*expected a dtype of float32"):
        decode_request_tensors({"x": bad}, CPU)
