"""Every bad request is answered with the right status and a message naming the field; never a stack trace."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from integration.conftest import start_server

from lossd.client import Client, InvalidArgumentError, LossdError, ResourceExhaustedError, TensorError
from lossd.client.codec import encode_tensor
from lossd.client.errors import from_rpc_error
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

N, K = 16, 5


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Client]:
    with Client(address, timeout=30) as c:
        yield c


@pytest.fixture
def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"logits": rng.standard_normal((N, K)).astype(np.float32), "labels": rng.integers(0, K, N)}


def assert_clean(exc: LossdError) -> None:
    """No server internals reach the client."""
    text = str(exc) + "".join(f"{v.field}{v.description}" for v in getattr(exc, "violations", []))
    assert "Traceback" not in text and 'File "' not in text and "site-packages" not in text, text


def expect_invalid(call: Callable[[], Any], field: str, *fragments: str) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        call()
    exc = info.value
    assert_clean(exc)
    fields = [v.field for v in exc.violations]
    assert field in fields, f"expected a violation of {field}, got {exc.violations}"
    description = next(v.description for v in exc.violations if v.field == field)
    for fragment in fragments:
        assert fragment in description, f"{field}: {fragment!r} not in {description!r}"
    assert field in exc.message  # the message names the field too
    return exc


def test_unknown_function(client: Client, batch: dict) -> None:
    expect_invalid(lambda: client.evaluate(batch, ["cross_entropy", "no_such_loss"]), "functions[1].name", "no_such_loss")


def test_unknown_parameter(client: Client, batch: dict) -> None:
    expect_invalid(
        lambda: client.evaluate(batch, "cross_entropy:smoothing=0.1"),
        "functions[0].params.smoothing",
        "unknown parameter",
        "label_smoothing",
    )


def test_wrong_parameter_type(client: Client, batch: dict) -> None:
    expect_invalid(
        lambda: client.evaluate(batch, "cross_entropy:label_smoothing=abc"),
        "functions[0].params.label_smoothing",
        "expected a number",
        "abc",
    )


def test_parameter_out_of_range(client: Client, batch: dict) -> None:
    expect_invalid(
        lambda: client.evaluate(batch, "cross_entropy:label_smoothing=1.5"), "functions[0].params.label_smoothing", "[0, 1]", "1.5"
    )


def test_bad_choice(client: Client, batch: dict) -> None:
    expect_invalid(lambda: client.evaluate(batch, "cross_entropy:reduction=average"), "functions[0].params.reduction", "average")


def test_several_violations_in_one_answer(client: Client, batch: dict) -> None:
    exc = expect_invalid(lambda: client.evaluate(batch, ["nope", "cross_entropy:label_smoothing=2"]), "functions[0].name")
    assert {v.field for v in exc.violations} >= {"functions[0].name", "functions[1].params.label_smoothing"}


def test_duplicate_alias(client: Client, batch: dict) -> None:
    expect_invalid(
        lambda: client.evaluate(batch, ["cross_entropy", "cross_entropy:label_smoothing=0.1"]), "functions[1].alias", "already used"
    )


@pytest.mark.parametrize(("shape", "data_len"), [([N, K], N * K * 4 - 4), ([N, K], N * K * 4 + 1), ([N, K + 1], N * K * 4)])
def test_byte_length_not_matching_dtype_times_shape(client: Client, batch: dict, shape: list[int], data_len: int) -> None:
    request = pb.EvaluateRequest(
        tensors={
            "logits": pb.Tensor(dtype=pb.FLOAT32, shape=shape, data=b"\x00" * data_len),
            "labels": encode_tensor(batch["labels"], "labels"),
        },
        functions=[pb.FunctionSpec(name="cross_entropy")],
    )
    expect_invalid(lambda: client.evaluate_request(request), "tensors.logits", f"byte length {data_len}", "float32", str(shape))


def test_unspecified_dtype(client: Client) -> None:
    request = pb.EvaluateRequest(tensors={"logits": pb.Tensor(shape=[1], data=b"\x00")}, functions=[pb.FunctionSpec(name="cross_entropy")])
    expect_invalid(lambda: client.evaluate_request(request), "tensors.logits", "DTYPE_UNSPECIFIED")


def test_wrong_rank(client: Client, batch: dict) -> None:
    expect_invalid(
        lambda: client.evaluate({**batch, "logits": batch["logits"][:, 0]}, "cross_entropy"), "tensors.logits", "expected shape", f"[{N}]"
    )


def test_wrong_shape(client: Client, batch: dict) -> None:
    expect_invalid(
        lambda: client.evaluate({**batch, "labels": batch["labels"][:-1]}, "cross_entropy"), "tensors.labels", f"[{N}]", f"[{N - 1}]"
    )


def test_wrong_dtype(client: Client, batch: dict) -> None:
    expect_invalid(
        lambda: client.evaluate({**batch, "labels": batch["labels"] + 0.5}, "cross_entropy"), "tensors.labels", "integer class indices"
    )


def test_labels_out_of_range_name_the_first_bad_index(client: Client, batch: dict) -> None:
    labels = batch["labels"].copy()
    labels[7] = K
    labels[11] = -3
    expect_invalid(
        lambda: client.evaluate({**batch, "labels": labels}, "cross_entropy"), "tensors.labels", f"[0, {K})", "index 7", f"got {K}"
    )


def test_missing_role(client: Client, batch: dict) -> None:
    expect_invalid(lambda: client.evaluate({"logits": batch["logits"]}, "cross_entropy"), "tensors.labels", "labels")
    expect_invalid(lambda: client.evaluate({"predictions": np.zeros(4)}, "mse"), "tensors.targets", "needs role 'targets'")


def test_input_mapping_to_a_missing_tensor(client: Client, batch: dict) -> None:
    spec = {"name": "cross_entropy", "inputs": {"logits": "student_logits"}}
    expect_invalid(lambda: client.evaluate({"labels": batch["labels"]}, [spec]), "tensors.student_logits", "student_logits")
    # Sent under the role's own name, that tensor is read by no function: refused too, pointing at the mapped name.
    expect_invalid(lambda: client.evaluate(batch, [spec]), "tensors.logits", "did you mean 'student_logits'?")


def test_unknown_role_in_inputs(client: Client, batch: dict) -> None:
    spec = {"name": "cross_entropy", "inputs": {"scores": "logits"}}
    expect_invalid(lambda: client.evaluate(batch, [spec]), "functions[0].inputs.scores", "no role 'scores'")


def test_reduction_none_inside_a_stream(client: Client, batch: dict) -> None:
    expect_invalid(lambda: client.evaluate_stream([batch, batch], "cross_entropy:reduction=none"), "functions[0].params.reduction", "none")


def test_functions_changing_inside_a_stream(address: str, batch: dict) -> None:
    first = pb.EvaluateRequest(
        tensors={k: encode_tensor(v, k) for k, v in batch.items()}, functions=[pb.FunctionSpec(name="cross_entropy")]
    )
    second = pb.EvaluateRequest(tensors=first.tensors, functions=[pb.FunctionSpec(name="accuracy")])
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossServiceStub(channel).EvaluateStream(iter([first, second]), timeout=30)
    exc = from_rpc_error(info.value)
    assert isinstance(exc, InvalidArgumentError) and [v.field for v in exc.violations] == ["messages[1].functions"]
    assert_clean(exc)


def test_finalize_errors(client: Client, batch: dict) -> None:
    state = client.evaluate(batch, "cross_entropy", return_state=True)["cross_entropy"].state
    expect_invalid(lambda: client.finalize([("", state)]), "states[0].alias", "alias")
    expect_invalid(lambda: client.finalize({"x": pb.State(function="no_such_loss", version=1)}), "states[0].state.function", "unknown")


def test_unknown_family(client: Client) -> None:
    expect_invalid(lambda: client.list_functions("astrology"), "family", "astrology", "regression")


def test_unsupported_dtype_is_refused_before_sending(batch: dict) -> None:
    with Client("127.0.0.1:1", timeout=1) as offline:  # nothing listens: the error must come first
        with pytest.raises(TensorError, match=r"tensors\.logits: unsupported dtype complex64"):
            offline.evaluate({**batch, "logits": batch["logits"].astype(np.complex64)}, "cross_entropy")


def test_message_over_the_size_limit() -> None:
    small = start_server(max_message_bytes=64 * 1024)
    try:
        with Client(small.address, timeout=30) as c:
            logits = np.zeros((1024, 64), np.float32)  # 256 KiB
            with pytest.raises(ResourceExhaustedError) as info:
                c.evaluate({"logits": logits, "labels": np.zeros(1024, np.int64)}, "cross_entropy")
            assert_clean(info.value)
            # a request under the limit still works on the same server
            ok = c.evaluate({"logits": logits[:8], "labels": np.zeros(8, np.int64)}, "cross_entropy")
            assert ok["cross_entropy"].value == pytest.approx(np.log(64))
    finally:
        small.stop()
