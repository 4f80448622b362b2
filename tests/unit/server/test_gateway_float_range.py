"""Gateway nested-list floats: a value is refused exactly when its cast to the tensor's dtype would be inf.

bfloat16's max (3.3895e38) is below float32's: judged on float32's max, 3.4e38 passed and came back as inf."""

from __future__ import annotations

import numpy as np
import pytest

from lossd.server.gateway.models import TensorBody, tensor_to_proto
from lossd.server.gateway.problems import Problem


def _proto(dtype: str, value: float):  # type: ignore[no-untyped-def]
    return tensor_to_proto("x", TensorBody(dtype=dtype, shape=[2], data=[value, 1.0]))


@pytest.mark.parametrize(
    ("dtype", "value"), [("bfloat16", 3.4e38), ("bfloat16", -3.397e38), ("float16", 65520.0), ("float32", 3.41e38), ("float32", 1e39)]
)
def test_a_value_that_would_become_inf_is_refused(dtype: str, value: float) -> None:
    with pytest.raises(Problem) as refused:
        _proto(dtype, value)
    assert f"outside the range of {dtype}" in refused.value.detail and "would become inf" in refused.value.detail


@pytest.mark.parametrize(("dtype", "value"), [("bfloat16", 3.3895e38), ("float16", 65519.0), ("float32", 3.4028235e38)])
def test_a_value_that_rounds_to_the_max_is_kept(dtype: str, value: float) -> None:
    import ml_dtypes

    t = _proto(dtype, value)
    decoded = np.frombuffer(t.data, dtype=ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)).astype(np.float64)
    assert decoded.shape == (2,) and np.isfinite(decoded).all()


@pytest.mark.parametrize(
    ("dtype", "shape", "data", "where"),
    [
        ("float32", [3], [1.5, True, 0.0], "data[1]"),
        ("int64", [2, 2], [[0, 1], [2, False]], "data[1][1]"),
        ("int64", [2], [True, False], "data[0]"),  # all booleans: numpy would make a bool array and cast it
        ("uint8", [1, 2], [[3, True]], "data[0][1]"),
    ],
)
def test_json_booleans_are_not_numbers(dtype: str, shape: list[int], data: list, where: str) -> None:
    with pytest.raises(Problem) as refused:
        tensor_to_proto("x", TensorBody(dtype=dtype, shape=shape, data=data))
    assert refused.value.detail.startswith("tensors.x.data: ")
    assert f"got a JSON boolean at {where}" in refused.value.detail


def test_json_booleans_are_bool_tensors() -> None:
    t = tensor_to_proto("x", TensorBody(dtype="bool", shape=[2, 2], data=[[True, False], [1, 0]]))
    assert np.frombuffer(t.data, dtype=np.bool_).tolist() == [True, False, True, False]
