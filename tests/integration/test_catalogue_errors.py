"""Input errors of every registered function, through the real gRPC service.

Generic over the catalogue: for each function, a missing role, an unknown
parameter, every declared range and choice, and a wrong dtype for each role
must come back as INVALID_ARGUMENT whose google.rpc.BadRequest names the
exact field.  Each error request breaks one thing in an otherwise valid
request (tests/catalogue_inputs.py), and the valid requests themselves are
checked to succeed.  ListFunctions must describe every function completely.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from catalogue_inputs import INPUTS, ROLE_GROUPS, valid_inputs
from lossd.client.codec import encode_tensors
from lossd.client.specs import specs_to_proto
from lossd.kernels import CODES, FunctionDef, all_functions
from lossd.kernels.params import Param
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

FUNCTIONS = {f.name: f for f in all_functions()}
NAMES = sorted(FUNCTIONS)


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.LossServiceStub(channel)


def request(tensors: Mapping[str, np.ndarray], spec: str | Mapping[str, Any]) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(tensors=encode_tensors(tensors), functions=specs_to_proto([spec]))


def violations(stub: pb_grpc.LossServiceStub, tensors: Mapping[str, np.ndarray], spec: str | Mapping[str, Any]) -> list[tuple[str, str]]:
    """Return the (field, description) pairs of the INVALID_ARGUMENT answer; fail if the call succeeds or answers otherwise."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(request(tensors, spec), timeout=30)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{spec}: {err.code()} {err.details()}"
    status = rpc_status.from_call(err)
    assert status is not None, f"{spec}: no rich status details"
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [(v.field, v.description) for v in bad.field_violations]
    assert found, f"{spec}: INVALID_ARGUMENT without field violations: {err.details()}"
    return found


def fields(stub: pb_grpc.LossServiceStub, tensors: Mapping[str, np.ndarray], spec: str | Mapping[str, Any]) -> list[str]:
    return [f for f, _ in violations(stub, tensors, spec)]


def inputs(name: str) -> dict[str, np.ndarray]:
    return valid_inputs(name, np.random.default_rng(0))


def test_every_function_has_valid_inputs():
    assert sorted(INPUTS) == NAMES
    assert set(ROLE_GROUPS) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_valid_request_succeeds(stub, name):
    response = stub.Evaluate(request(inputs(name), name), timeout=30)
    assert [r.function for r in response.results] == [name]
    assert list(response.diagnostics) == []


def test_diagnostics_reach_the_response(stub):
    """Findings come back with their code, severity, function alias and count (request-level ones with no alias)."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((32, 4)).astype(np.float32)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.arange(32) % 4
    labels[:24] = -100
    student = z.copy()
    student[0, 0] = np.nan
    tensors = {"logits": probs, "labels": labels, "student": student}
    specs = [{"name": "cross_entropy"}, {"name": "accuracy", "inputs": {"logits": "student"}, "alias": "acc"}]
    response = stub.Evaluate(pb.EvaluateRequest(tensors=encode_tensors(tensors), functions=specs_to_proto(specs)), timeout=30)
    found = {(d.code, d.function): (d.severity, d.count, d.message) for d in response.diagnostics}
    assert set(found) == {
        ("probabilities_as_logits", "cross_entropy"),
        ("ignored_fraction", "cross_entropy"),
        ("ignored_fraction", "acc"),
        ("nan_or_inf", ""),
    }
    assert found[("probabilities_as_logits", "cross_entropy")][:2] == (pb.WARNING, 1)
    assert found[("ignored_fraction", "acc")][:2] == (pb.INFO, 1)
    assert found[("nan_or_inf", "")][0] == pb.ERROR and "'student'" in found[("nan_or_inf", "")][2]


def test_top_k_covering_every_class_warns_through_the_server(stub):
    """top_k_accuracy with k >= K keeps its perfect score, and the warning that it means nothing reaches the response."""
    tensors = {"logits": np.random.default_rng(2).standard_normal((16, 3)).astype(np.float32), "labels": np.arange(16) % 3}
    specs = [{"name": "top_k_accuracy", "params": {"k": 3}}, {"name": "top_k_accuracy", "alias": "top2", "params": {"k": 2}}]
    response = stub.Evaluate(pb.EvaluateRequest(tensors=encode_tensors(tensors), functions=specs_to_proto(specs)), timeout=30)
    assert response.results[0].values["value"] == 1.0
    found = [(d.code, d.function, d.severity, d.count) for d in response.diagnostics]
    assert found == [("top_k_covers_all_classes", "top_k_accuracy", pb.WARNING, 1)]
    assert "k=3 >= the 3 classes of 'logits'" in response.diagnostics[0].message


# -- (a) missing roles -------------------------------------------------------------------------


def accepted_missing_role_fields(fdef: FunctionDef) -> set[str]:
    required = [r.name for r in fdef.roles if not r.optional]
    return {f"tensors.{r}" for r in (required[:1] + sorted(ROLE_GROUPS.get(fdef.name, ())))}


@pytest.mark.parametrize("name", NAMES)
def test_missing_required_roles(stub, name):
    fdef = FUNCTIONS[name]
    found = violations(stub, {}, name)
    assert len(found) == 1
    field, description = found[0]
    assert field in accepted_missing_role_fields(fdef), f"{name}: {found}"
    assert field.removeprefix("tensors.") in description


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_no_role_reads_is_refused(stub, name):
    """A misspelt optional role would change nothing: it is refused, naming it and what the function reads."""
    found = violations(stub, {**inputs(name), "unrelated": np.zeros(3, np.float32)}, name)
    assert [f for f, _ in found] == ["tensors.unrelated"], f"{name}: {found}"
    assert "no requested function reads a tensor named 'unrelated'" in found[0][1]
    assert all(role.name in found[0][1] for role in FUNCTIONS[name].roles), found[0][1]


def test_missing_role_under_a_mapped_name(stub):
    """A role mapped to another tensor name is reported under that name."""
    spec = {"name": "cross_entropy", "inputs": {"logits": "student_logits"}}
    sent = {name: t for name, t in inputs("cross_entropy").items() if name != "logits"}
    assert fields(stub, sent, spec) == ["tensors.student_logits"]
    # Sent under the role's own name instead, the tensor is one no role reads: refused, pointing at the mapped name.
    ((field, description),) = violations(stub, inputs("cross_entropy"), spec)
    assert field == "tensors.logits" and "did you mean 'student_logits'?" in description


# -- (b) unknown parameter ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter(stub, name):
    found = violations(stub, inputs(name), {"name": name, "params": {"no_such_param": 1}})
    assert [f for f, _ in found] == ["functions[0].params.no_such_param"]
    known = [p.name for p in FUNCTIONS[name].params]
    assert all(p in found[0][1] for p in known), f"{name}: the description should list the known parameters {known}: {found[0][1]}"


# -- (c) out-of-range numbers, (d) bad choices -------------------------------------------------


def out_of_range(p: Param) -> list[float]:
    """Return values just outside each declared bound (the bound itself when it is exclusive)."""

    def step(bound: float) -> float:  # relative for floats: 1e30 + 1e-3 is 1e30
        return 1 if p.kind == "int" else max(1e-3, abs(bound) * 1e-6)

    bad = []
    if p.minimum is not None:
        bad.append(p.minimum if p.exclusive_minimum else p.minimum - step(p.minimum))
    if p.maximum is not None:
        bad.append(p.maximum if p.exclusive_maximum else p.maximum + step(p.maximum))
    return bad


def ranged(fdef: FunctionDef) -> list[Param]:
    return [
        p
        for p in fdef.params
        if p.kind in ("float", "int", "float_list", "float_or_list") and (p.minimum is not None or p.maximum is not None)
    ]


def with_choices(fdef: FunctionDef) -> list[Param]:
    return [p for p in fdef.params if p.kind == "str" and p.choices]


@pytest.mark.parametrize("name", [n for n in NAMES if ranged(FUNCTIONS[n])])
def test_out_of_range_parameters(stub, name):
    batch = inputs(name)
    for p in ranged(FUNCTIONS[name]):
        for bad in out_of_range(p):
            value: Any = [bad] if p.kind == "float_list" else bad
            found = violations(stub, batch, {"name": name, "params": {p.name: value}})
            field = f"functions[0].params.{p.name}" + ("[0]" if p.kind == "float_list" else "")
            assert [f for f, _ in found] == [field], f"{name}.{p.name}={value}: {found}"
            assert p.range_text() in found[0][1], (
                f"{name}.{p.name}: the description should give the range {p.range_text()!r}: {found[0][1]}"
            )


@pytest.mark.parametrize("name", [n for n in NAMES if with_choices(FUNCTIONS[n])])
def test_bad_choices(stub, name):
    batch = inputs(name)
    for p in with_choices(FUNCTIONS[name]):
        found = violations(stub, batch, {"name": name, "params": {p.name: "no_such_choice"}})
        assert [f for f, _ in found] == [f"functions[0].params.{p.name}"], f"{name}.{p.name}: {found}"
        assert all(repr(c) in found[0][1] for c in p.choices or ()), f"{name}.{p.name}: {found[0][1]}"


def test_every_declared_range_and_choice_is_exercised():
    """The parametrizations above are not empty by accident."""
    assert sum(len(ranged(f)) for f in FUNCTIONS.values()) > 40
    assert sum(len(with_choices(f)) for f in FUNCTIONS.values()) > 40


# -- (e) wrong dtypes ---------------------------------------------------------------------------


def breakable_roles(fdef: FunctionDef, batch: Mapping[str, np.ndarray]) -> list[str]:
    """List the required roles, and the member of a role group that the valid batch uses."""
    group = ROLE_GROUPS.get(fdef.name, frozenset())
    return [r.name for r in fdef.roles if (not r.optional or r.name in group) and r.name in batch and r.dtype in ("float", "index")]


def wrong_dtype(fdef: FunctionDef, role: str, value: np.ndarray) -> np.ndarray:
    """Send a float role as bool, an index role as floats holding non-integers."""
    if fdef.role(role).dtype == "float":
        return np.asarray(value) > 0
    return np.asarray(value).astype(np.float32) + 0.5


@pytest.mark.parametrize("name", NAMES)
def test_wrong_dtype(stub, name):
    fdef = FUNCTIONS[name]
    batch = inputs(name)
    roles = breakable_roles(fdef, batch)
    assert roles, f"{name}: no role to break"
    for role in roles:
        broken = {**batch, role: wrong_dtype(fdef, role, batch[role])}
        found = violations(stub, broken, name)
        assert [f for f, _ in found] == [f"tensors.{role}"], f"{name}: {role} sent as {broken[role].dtype}: {found}"
        description = found[0][1]
        assert name in description and ("bool" in description or "integer" in description), f"{name}.{role}: {description}"


# -- ListFunctions -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def listed(stub) -> dict[str, pb.FunctionInfo]:
    return {f.name: f for f in stub.ListFunctions(pb.ListFunctionsRequest(), timeout=30).functions}


def test_list_functions_lists_every_function_and_code(stub, listed):
    assert sorted(listed) == NAMES
    codes = stub.ListFunctions(pb.ListFunctionsRequest(), timeout=30).diagnostics
    assert {d.code: d.meaning != "" for d in codes} == dict.fromkeys(CODES, True)


@pytest.mark.parametrize("name", NAMES)
def test_list_functions_describes_function_completely(listed, name):
    info, fdef = listed[name], FUNCTIONS[name]
    assert info.summary.strip() and info.reference.strip(), name
    assert info.family == fdef.family
    assert list(info.aliases) == list(fdef.aliases)
    assert info.splittable == (fdef.splittable and fdef.splittable_if is None)  # conservative when it depends on params
    assert [r.name for r in info.roles] == [r.name for r in fdef.roles]
    for r in info.roles:
        assert r.shape.strip() and r.doc.strip(), f"{name}.{r.name}: {r}"
        assert r.dtype in ("float", "index", "binary", "any"), f"{name}.{r.name}: {r.dtype!r}"
    assert [p.name for p in info.params] == [p.name for p in fdef.params]
    for p, declared in zip(info.params, fdef.params, strict=True):
        assert p.doc.strip() and p.type == declared.kind, f"{name}.{p.name}: {p}"
        assert list(p.choices) == list(declared.choices or ())
        assert p.nullable == declared.nullable
        if declared.choices or declared.minimum is not None or declared.maximum is not None:
            assert p.range.strip(), f"{name}.{p.name}: no range text"
        for bound in (declared.minimum, declared.maximum):
            if bound is not None:
                assert f"{bound:g}" in p.range, f"{name}.{p.name}: {bound:g} not in {p.range!r}"
    assert "value" in [o.name for o in info.outputs], f"{name}: no primary output"


def test_embedding_functions_are_not_splittable(listed):
    embedding = {info.name: info.splittable for info in listed.values() if info.family == "embedding"}
    catalogue = (
        "info_nce",
        "nt_xent",
        "supcon",
        "triplet",
        "contrastive_pair",
        "multi_similarity",
        "circle",
        "arcface",
        "cosface",
        "sphereface",
    )
    assert embedding == dict.fromkeys(catalogue, False)
