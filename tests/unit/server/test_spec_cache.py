"""The spec cache: valid ``functions`` lists are validated once and shared immutably; invalid ones keep their exact errors."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from lossd.kernels.errors import InvalidInput
from lossd.kernels.evaluate import PreparedSpecs, evaluate, prepare
from lossd.server.convert import specs_from_request
from lossd.server.spec_cache import SpecCache
from lossd.v1 import lossd_pb2 as pb


def spec(name: str, alias: str = "", **params: object) -> pb.FunctionSpec:
    return pb.FunctionSpec(name=name, alias=alias, params=json_format.ParseDict(params, Struct()))


def uncached_error(functions: list[pb.FunctionSpec]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidInput) as caught:
        prepare(specs_from_request(functions))
    return [(v.field, v.description) for v in caught.value.violations]


def test_a_repeated_list_is_validated_once_and_shared() -> None:
    cache = SpecCache()
    first = cache.prepared([spec("cross_entropy", label_smoothing=0.1), spec("accuracy")])
    again = cache.prepared([spec("cross_entropy", label_smoothing=0.1), spec("accuracy")])
    assert isinstance(first, PreparedSpecs) and again is first
    assert [p.alias for p in first] == ["cross_entropy", "accuracy"] and first[0].params["label_smoothing"] == 0.1
    assert cache.prepared([spec("cross_entropy", label_smoothing=0.2), spec("accuracy")]) is not first  # other params, other entry
    assert len(cache) == 2


def test_param_order_on_the_wire_does_not_split_entries() -> None:
    cache = SpecCache()
    a = cache.prepared([spec("cross_entropy", label_smoothing=0.1, ignore_index=3)])
    b = cache.prepared([spec("cross_entropy", ignore_index=3, label_smoothing=0.1)])
    assert a is b


def test_prepared_specs_cannot_be_changed_by_one_request_for_the_next() -> None:
    (p,) = SpecCache().prepared([pb.FunctionSpec(name="cross_entropy", inputs={"logits": "z"})]) or ()
    with pytest.raises(TypeError):
        p.params["reduction"] = "sum"  # type: ignore[index]
    with pytest.raises(TypeError):
        p.inputs["logits"] = "other"  # type: ignore[index]


def test_prepare_takes_prepared_specs_as_they_are() -> None:
    import torch

    prepared = prepare(["cross_entropy"])
    assert prepare(prepared) is prepared
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    via_prepared = evaluate({"logits": logits, "labels": labels}, prepared)
    assert via_prepared.prepared is prepared
    assert via_prepared["cross_entropy"].value == evaluate({"logits": logits, "labels": labels}, ["cross_entropy"])["cross_entropy"].value


@pytest.mark.parametrize(
    "functions",
    [
        [],
        [pb.FunctionSpec(name="")],
        [spec("no_such_function")],
        [spec("cross_entropy", reduction="avg")],
        [spec("cross_entropy", label_smoothing=float("nan"))],
        [spec("cross_entropy"), spec("cross_entropy")],  # the same alias twice
        [spec("cross_entropy", unknown=1), spec("accuracy", inputs=2)],
    ],
)
def test_invalid_lists_are_not_kept_and_keep_their_errors(functions: list[pb.FunctionSpec]) -> None:
    cache = SpecCache()
    expected = uncached_error(functions)
    assert cache.prepared(functions) is None and cache.prepared(functions) is None
    assert len(cache) == 0
    assert uncached_error(functions) == expected  # the caller's uncached path refuses them as before


def test_the_cache_is_bounded_in_entries_and_key_bytes() -> None:
    cache = SpecCache(max_entries=2)
    lists = [[spec("cross_entropy", label_smoothing=s / 10)] for s in range(3)]
    first = cache.prepared(lists[0])
    cache.prepared(lists[1])
    assert cache.prepared(lists[0]) is first  # used again: now the most recent
    cache.prepared(lists[2])  # evicts lists[1], the least recently used
    assert len(cache) == 2 and cache.prepared(lists[0]) is first
    small_keys = SpecCache(max_key_bytes=16)
    long_alias = [spec("cross_entropy", alias="a" * 64)]
    assert small_keys.prepared(long_alias) is not None and len(small_keys) == 0  # validated, not kept
    assert SpecCache(max_entries=0).prepared(long_alias) is not None
    with pytest.raises(ValueError, match="max_entries and max_key_bytes"):
        SpecCache(max_entries=-1)


def test_specs_falls_back_to_the_uncached_path_with_its_errors_in_place() -> None:
    cache = SpecCache()
    valid = cache.prepared([spec("accuracy")])
    assert cache.specs([spec("accuracy")]) is valid and cache.specs([spec("ignored")], valid) is valid
    with pytest.raises(InvalidInput, match=r"expected a function name"):  # specs_from_request's error, raised here
        cache.specs([pb.FunctionSpec(name="")])
    unknown = cache.specs([spec("no_such_function")])  # parsed; prepare() refuses it later, after the tensors are decoded
    assert not isinstance(unknown, PreparedSpecs) and [s.name for s in unknown] == ["no_such_function"]
