"""Request building: specs, tags, row splits for streams, states to finalize, channel options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lossd.client.channel import DEFAULT_ATTEMPTS, GRPC_OPTIONS, channel_options
from lossd.client.codec import decode_tensor
from lossd.client.messages import (
    arrays_of,
    batch_bytes,
    batch_requests,
    evaluate_request,
    finalize_request,
    function_specs,
    named_states,
    split_rows,
    splittable_names,
    tags_proto,
)
from lossd.client.specs import SpecError
from lossd.v1 import lossd_pb2 as pb


def test_function_specs_forms() -> None:
    one = function_specs("ece:n_bins=15")
    assert [s.name for s in one] == ["ece"] and one[0].params["n_bins"] == 15
    mapping = function_specs({"name": "cross_entropy", "alias": "ce"})
    assert [(s.name, s.alias) for s in mapping] == [("cross_entropy", "ce")]
    ready = pb.FunctionSpec(name="mse")
    mixed = function_specs(["cross_entropy", {"name": "accuracy"}, ready])
    assert [s.name for s in mixed] == ["cross_entropy", "accuracy", "mse"]


@pytest.mark.parametrize(
    ("bad", "error"), [([], ValueError), ((), ValueError), (None, ValueError), ([""], SpecError), (["ece:bins"], SpecError)]
)
def test_function_specs_errors(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        function_specs(bad)  # type: ignore[arg-type]


def test_tags() -> None:
    assert tags_proto(None) is None
    assert tags_proto({"model": "m", "split": "validation"}) == pb.Tags(model="m", split="validation")
    t = pb.Tags(dataset="d")
    assert tags_proto(t) is t
    # Other keys are free-form tags (the dashboard's history, not Prometheus labels); numbers as text.
    assert tags_proto({"team": "x", "step": 12}) == pb.Tags(extra={"team": "x", "step": "12"})
    with pytest.raises(TypeError, match="expected tag 'model' to be a string, got int"):
        tags_proto({"model": 3})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="expected tags as a mapping"):
        tags_proto(["model"])  # type: ignore[arg-type]


def test_arrays_of() -> None:
    arrays = arrays_of({"a": torch.ones(2, 3), "b": [[1, 2]], "c": np.zeros(4, np.float16)})
    assert {k: (v.dtype.name, v.shape) for k, v in arrays.items()} == {
        "a": ("float32", (2, 3)),
        "b": ("int64", (1, 2)),
        "c": ("float16", (4,)),
    }
    assert batch_bytes(arrays) == 24 + 16 + 8
    with pytest.raises(TypeError, match="expected tensors as a mapping"):
        arrays_of([np.zeros(2)])  # type: ignore[arg-type]


def test_split_rows_small_batch_is_whole() -> None:
    arrays = {"logits": np.zeros((10, 4), np.float32), "labels": np.zeros(10, np.int64)}
    assert len(split_rows(arrays, batch_bytes(arrays))) == 1


@pytest.mark.parametrize("rows", [2, 7, 100, 1001])
@pytest.mark.parametrize("max_bytes", [1, 100, 1000, 4096])
def test_split_rows_covers_every_row_once(rows: int, max_bytes: int) -> None:
    arrays = {"logits": np.arange(rows * 5, dtype=np.float32).reshape(rows, 5), "labels": np.arange(rows)}
    parts = split_rows(arrays, max_bytes)
    total = batch_bytes(arrays)
    assert len(parts) == (1 if total <= max_bytes else min(rows, -(-total // max_bytes)))
    assert all(p["logits"].shape[0] == p["labels"].shape[0] > 0 for p in parts)
    for name in arrays:
        assert np.array_equal(np.concatenate([p[name] for p in parts]), arrays[name])
    if len(parts) > 1 and len(parts) < rows:
        assert max(batch_bytes(p) for p in parts) <= max_bytes + batch_bytes({k: v[:1] for k, v in arrays.items()})


@pytest.mark.parametrize(
    "arrays",
    [
        {"query": np.zeros((8, 4)), "keys": np.zeros((16, 4))},  # different first dimensions
        {"logits": np.zeros((8, 4)), "scale": np.zeros(())},  # a scalar tensor
        {"logits": np.zeros((1, 400))},  # a single row
    ],
)
def test_split_rows_keeps_unsplittable_layouts_whole(arrays: dict) -> None:
    assert len(split_rows(arrays, 8)) == 1


def test_split_rows_refuses_bad_size() -> None:
    with pytest.raises(ValueError, match="expected max_bytes > 0"):
        split_rows({"a": np.zeros(3)}, 0)


def test_batch_requests_first_message_names_the_functions() -> None:
    specs = function_specs(["cross_entropy"])
    arrays = {"logits": np.zeros((6, 3), np.float32), "labels": np.zeros(6, np.int64)}
    parts = split_rows(arrays, 40)
    first = [
        pb.EvaluateRequest.FromString(m)
        for m in batch_requests(0, parts, specs, tags=pb.Tags(model="m"), return_state=True, request_id="r1", nan_policy="omit")
    ]
    assert len(first) == len(parts) > 1
    assert len({m.batch_id for m in first}) == 1 and first[0].batch_id
    assert list(first[0].functions) == specs and first[0].tags.model == "m" and first[0].return_state and first[0].request_id == "r1"
    assert first[0].nan_policy == pb.NAN_POLICY_OMIT
    assert all(not m.functions and not m.request_id and not m.HasField("tags") and not m.nan_policy for m in first[1:])
    later = [pb.EvaluateRequest.FromString(m) for m in batch_requests(1, [arrays], specs, tags=None, return_state=True, request_id="r1")]
    assert len(later) == 1 and not later[0].functions and later[0].batch_id == ""
    rows = np.concatenate([decode_tensor(m.tensors["logits"], "logits") for m in first])
    assert rows.shape == (6, 3)


def test_evaluate_request() -> None:
    state = pb.State(function="cross_entropy", version=1)
    request = evaluate_request(
        {"x": np.ones(2)}, function_specs("mse"), tags=pb.Tags(split="s"), return_state=True, request_id="id", prior_states={"mse": state}
    )
    assert request.prior_states["mse"] == state and request.tags.split == "s" and request.request_id == "id"
    assert not evaluate_request({}, ()).HasField("tags")


def test_named_states_forms() -> None:
    a, b = pb.State(function="mse"), pb.State(function="ece")
    expected = [pb.NamedState(alias="mse", state=a), pb.NamedState(alias="ece", state=b)]
    assert named_states({"mse": a, "ece": b}) == expected
    assert named_states([("mse", a), ("ece", b)]) == expected
    assert named_states(expected) == expected
    assert named_states([{"mse": a}, {"ece": b}]) == expected  # one mapping per rank
    with pytest.raises(ValueError, match="at least one state"):
        named_states({})
    with pytest.raises(TypeError, match="expected an alias"):
        named_states([("mse", "not a state")])
    with pytest.raises(TypeError, match="expected \\(alias, State\\) pairs"):
        named_states([a])
    request = finalize_request({"mse": a}, tags=pb.Tags(model="m"), return_state=True, request_id="x")
    assert request.tags.model == "m" and request.return_state and len(request.states) == 1


def test_splittable_names_include_aliases() -> None:
    catalogue = pb.ListFunctionsResponse(
        functions=[pb.FunctionInfo(name="mae", aliases=["l1"], splittable=True), pb.FunctionInfo(name="nt_xent", splittable=False)]
    )
    assert splittable_names(catalogue) == {"mae": True, "l1": True, "nt_xent": False}


def test_channel_options_have_no_grpc_retry_policy() -> None:
    # A policy retrying UNAVAILABLE would replay a request that crashed its server (lossd.client.retries retries).
    for attempts in (1, DEFAULT_ATTEMPTS):
        options = dict(channel_options(attempts=attempts))
        assert "grpc.service_config" not in options and options["grpc.enable_retries"] == 1  # transparent retries only
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="expected attempts to be an integer >= 1"):
            channel_options(attempts=bad)  # type: ignore[arg-type]


def test_channel_options() -> None:
    options = dict(channel_options())
    for name, value in GRPC_OPTIONS:
        assert options[name] == value
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.max_receive_message_length"] == -1 and options["grpc.max_send_message_length"] == -1
    assert len(channel_options()) == len(options)  # every option once
    overridden = dict(channel_options(attempts=1, extra=[("grpc.max_send_message_length", 1024), ("grpc.primary_user_agent", "me")]))
    assert overridden["grpc.max_send_message_length"] == 1024 and overridden["grpc.primary_user_agent"] == "me"
    with pytest.raises(TypeError, match="expected channel options as \\(name, value\\) pairs"):
        channel_options(extra=["grpc.x"])  # type: ignore[list-item]


def test_server_uses_the_client_grpc_options() -> None:
    settings = pytest.importorskip("lossd.server.settings", reason="the server distribution is not installed")

    assert settings.GRPC_OPTIONS is GRPC_OPTIONS
