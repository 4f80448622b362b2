"""Tensors on the wire: every dtype, torch tensors (bfloat16 included), nested lists, length checks."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from lossd.client.codec import DTYPE_NAMES, TensorError, decode_tensor, decode_tensors, dtype_of, encode_tensor, encode_tensors, to_numpy
from lossd.v1 import lossd_pb2 as pb

NUMPY_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
    "bool": np.bool_,
}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4, 5)]


def sample(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if name == "bool":
        return rng.random(shape) < 0.5
    if name in ("int64", "int32"):
        return rng.integers(-1000, 1000, shape).astype(NUMPY_DTYPES[name])
    if name == "uint8":
        return rng.integers(0, 256, shape).astype(np.uint8)
    return (rng.standard_normal(shape) * 100).astype(NUMPY_DTYPES[name])


def test_every_wire_dtype_is_covered() -> None:
    assert set(DTYPE_NAMES) == set(NUMPY_DTYPES) == set(TORCH_DTYPES)
    assert set(DTYPE_NAMES.values()) == set(pb.DType.values()) - {pb.DTYPE_UNSPECIFIED}


@pytest.mark.parametrize("name", list(NUMPY_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_round_trip(name: str, shape: tuple[int, ...]) -> None:
    array = sample(name, shape, np.random.default_rng(0))
    wire = encode_tensor(array, "x")
    assert wire.dtype == DTYPE_NAMES[name]
    assert list(wire.shape) == list(shape)
    back = decode_tensor(pb.Tensor.FromString(wire.SerializeToString()), "x")
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()  # bit-exact, NaN payloads included


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_torch_round_trip(name: str) -> None:
    t = torch.from_numpy(sample(name, (4, 6), np.random.default_rng(1))) if name != "bfloat16" else torch.randn(4, 6).to(torch.bfloat16)
    t = t.to(TORCH_DTYPES[name])
    wire = encode_tensor(t, "t")
    assert wire.dtype == DTYPE_NAMES[name]
    back = decode_tensor(wire, "t")
    assert list(back.shape) == [4, 6]
    if name == "bfloat16":
        assert back.dtype == np.dtype(ml_dtypes.bfloat16)
        assert back.view(np.int16).tobytes() == t.view(torch.int16).numpy().tobytes()  # bit-exact
        assert torch.equal(torch.from_numpy(back.astype(np.float32)), t.float())
    else:
        assert np.array_equal(back, t.numpy())


def test_torch_non_contiguous_and_requires_grad() -> None:
    t = torch.randn(5, 8, requires_grad=True)
    view = t[:, ::2].t()
    back = decode_tensor(encode_tensor(view, "v"), "v")
    assert np.array_equal(back, view.detach().numpy())


def test_torch_bfloat16_non_contiguous() -> None:
    t = torch.randn(6, 4).to(torch.bfloat16).t()
    back = decode_tensor(encode_tensor(t, "v"), "v")
    assert np.array_equal(back.astype(np.float32), t.float().numpy())


@pytest.mark.parametrize(
    ("value", "dtype", "shape"),
    [
        ([[1.5, 2.0], [3.0, 4.25]], "float64", [2, 2]),
        ([[1, 2, 3]], "int64", [1, 3]),
        ([True, False, True], "bool", [3]),
        (3.5, "float64", []),
        (7, "int64", []),
        ([], "float64", [0]),
        ((1, 2), "int64", [2]),
    ],
)
def test_nested_lists(value: object, dtype: str, shape: list[int]) -> None:
    wire = encode_tensor(value, "n")
    assert wire.dtype == DTYPE_NAMES[dtype] and list(wire.shape) == shape
    assert np.array_equal(decode_tensor(wire, "n"), np.asarray(value))


def test_ragged_list_refused() -> None:
    with pytest.raises(TensorError, match=r"tensors\.r: expected a rectangular nested list"):
        encode_tensor([[1, 2], [3]], "r")


@pytest.mark.parametrize(
    "value", [np.zeros(3, dtype=np.complex64), np.zeros(2, dtype=np.int16), np.array(["a"]), np.zeros(2, dtype=np.uint32)]
)
def test_unsupported_dtype_refused(value: np.ndarray) -> None:
    with pytest.raises(TensorError, match=r"tensors\.u: unsupported dtype \w+; lossd carries float32, .*: .* first"):
        encode_tensor(value, "u")


def test_unsupported_type_refused() -> None:
    with pytest.raises(TensorError, match=r"expected a numpy array, torch tensor or nested list, got dict"):
        encode_tensor({"a": 1}, "d")


def test_big_endian_is_sent_little_endian() -> None:
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    wire = encode_tensor(array, "b")
    assert wire.data == np.arange(6, dtype="<f4").tobytes()
    assert np.array_equal(decode_tensor(wire, "b"), array)


def test_decode_is_zero_copy_and_read_only() -> None:
    wire = encode_tensor(np.arange(12, dtype=np.float32).reshape(3, 4), "z")
    back = decode_tensor(wire, "z")
    assert not back.flags.writeable  # a view of the message's bytes, not a copy
    assert back.base is not None


@pytest.mark.parametrize(
    ("data_len", "dtype", "shape"),
    [(11, pb.FLOAT32, [3]), (13, pb.FLOAT32, [3]), (0, pb.INT64, [1]), (5, pb.BFLOAT16, [2, 1]), (3, pb.BOOL, [])],
)
def test_byte_length_mismatch(data_len: int, dtype: int, shape: list[int]) -> None:
    wire = pb.Tensor(dtype=dtype, shape=shape, data=b"\x00" * data_len)
    with pytest.raises(
        TensorError, match=rf"tensors\.logits: byte length {data_len} does not match dtype \w+ × shape \[.*\] \(expected \d+ bytes\)"
    ) as info:
        decode_tensor(wire, "logits")
    assert info.value.field == "tensors.logits"


def test_negative_dimension() -> None:
    with pytest.raises(TensorError, match=r"expected non-negative dimensions, got shape \[2, -1\]"):
        decode_tensor(pb.Tensor(dtype=pb.FLOAT32, shape=[2, -1], data=b""), "x")


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 99])
def test_unknown_wire_dtype(dtype: int) -> None:
    with pytest.raises(TensorError, match=r"tensors\.x: expected a dtype of float32"):
        decode_tensor(pb.Tensor(dtype=dtype, shape=[1], data=b"\x00"), "x")


def test_mappings_and_helpers() -> None:
    tensors = {"a": np.ones((2, 2), np.float32), "b": [1, 2]}
    back = decode_tensors(encode_tensors(tensors))
    assert set(back) == {"a", "b"} and back["b"].dtype == np.int64
    assert dtype_of(np.zeros(1, ml_dtypes.bfloat16), "x") == pb.BFLOAT16
    assert to_numpy(torch.ones(2), "t").dtype == np.float32


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(np.float32(2.5), "float32"), (np.int32(-3), "int32"), (np.bool_(True), "bool"), (ml_dtypes.bfloat16(1.5), "bfloat16")],
)
def test_numpy_scalars(value: object, dtype: str) -> None:
    wire = encode_tensor(value, "s")
    assert wire.dtype == DTYPE_NAMES[dtype] and list(wire.shape) == []
    assert decode_tensor(wire, "s").item() == value
