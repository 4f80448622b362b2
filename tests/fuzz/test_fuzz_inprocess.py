"""Hypothesis over the servicer's decoder, every function's validation and the state checks.

Requests go through the calls the servicer makes (lossd.server.convert, then
lossd.kernels) without gRPC in between; every outcome must be a success or a
deliberate status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED), never an exception
that lossd.server.errors would answer with INTERNAL.  About 10,000 cases.
"""

from __future__ import annotations

import os
import random
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
from google.rpc import code_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutations import Mutator

from lossd.kernels import all_functions, evaluate, finalize_states
from lossd.kernels.evaluate import Accumulator
from lossd.server.convert import (
    decode_request_tensors,
    evaluation_to_proto,
    list_functions_response,
    specs_from_request,
    state_from_proto,
)
from lossd.server.errors import status_for
from lossd.v1 import lossd_pb2 as pb

CPU = torch.device("cpu")
EXACT_STATE_LIMIT = 100_000
CATALOGUE = list_functions_response(all_functions())
DELIBERATE = (code_pb2.INVALID_ARGUMENT, code_pb2.RESOURCE_EXHAUSTED)


def fuzz_settings(examples: int) -> Any:
    """Bounded, repeatable runs in ``make test``; LOSSD_FUZZ_EXPLORE=1 draws new cases on every run."""
    explore = os.environ.get("LOSSD_FUZZ_EXPLORE") == "1"
    return settings(
        max_examples=examples, deadline=None, database=None, derandomize=not explore, suppress_health_check=[HealthCheck.too_slow]
    )


def serve_evaluate(request: pb.EvaluateRequest) -> pb.EvaluateResponse:
    """What LossService.Evaluate does between decoding and encoding."""
    specs = specs_from_request(list(request.functions))
    tensors = decode_request_tensors(request.tensors, CPU)
    prior = {alias: state_from_proto(s, f"prior_states.{alias}") for alias, s in request.prior_states.items()}
    evaluation = evaluate(
        tensors, specs, device=CPU, return_state=request.return_state, prior_states=prior or None, exact_state_limit=EXACT_STATE_LIMIT
    )
    return evaluation_to_proto(evaluation, request.request_id)


def serve_stream(messages: list[pb.EvaluateRequest]) -> pb.EvaluateResponse:
    """What LossService.EvaluateStream does with each message (prior_states are refused there first)."""
    acc = Accumulator(specs_from_request(list(messages[0].functions)), device=CPU, exact_state_limit=EXACT_STATE_LIMIT)
    for m in messages:
        acc.add(decode_request_tensors(m.tensors, CPU), m.batch_id)
    return evaluation_to_proto(acc.result(return_state=messages[0].return_state))


def serve_finalize(request: pb.FinalizeRequest) -> pb.EvaluateResponse:
    states = [(s.alias, state_from_proto(s.state, f"states[{i}].state")) for i, s in enumerate(request.states)]
    evaluation = finalize_states(states, exact_state_limit=EXACT_STATE_LIMIT, return_state=request.return_state)
    return evaluation_to_proto(evaluation, request.request_id)


def outcome(call: Callable[[], pb.EvaluateResponse], request: Any) -> pb.EvaluateResponse | None:
    """The response, None for a deliberate refusal; fails the test on anything that would be INTERNAL."""
    try:
        response = call()
    except Exception as exc:  # noqa: BLE001 - classifying every exception is the point
        if status_for(exc).code in DELIBERATE:
            return None
        pytest.fail(f"{type(exc).__name__} would be INTERNAL for\n{str(request)[:3000]}\n{traceback.format_exc()}")
    response.SerializeToString()  # the response must encode (uint64 ranges, finite sizes)
    return response


def _mutator(rng: random.Random) -> Mutator:
    mutator = Mutator(CATALOGUE, rng)
    mutator.states = STATES
    return mutator


def _seed_states() -> list[pb.State]:
    """One valid state of every function, for prior_states and Finalize."""
    m = Mutator(CATALOGUE, random.Random(0))
    states = []
    for name in m.names:
        request = m.valid_request(name, vary=0)
        request.return_state = True
        response = serve_evaluate(request)
        states += [r.state for r in response.results if r.HasField("state")]
    return states


STATES = _seed_states()


@fuzz_settings(4000)
@given(st.randoms(use_true_random=False))
def test_evaluate_requests(rng: random.Random) -> None:
    m = _mutator(rng)
    request = m.evaluate_request()
    outcome(lambda: serve_evaluate(request), request)


@pytest.mark.parametrize("name", [f.name for f in all_functions()])
@fuzz_settings(30)
@given(st.randoms(use_true_random=False))
def test_every_function_validates(name: str, rng: random.Random) -> None:
    """Mutated params, inputs and tensors of each catalogue function (66 × 30 cases)."""
    m = _mutator(rng)
    # Every declaration carries a valid example, so every function has a batch to mutate.
    assert name in m.functions, f"no valid batch of {name} in catalogue_inputs"
    request = m.evaluate_request(name=name)
    outcome(lambda: serve_evaluate(request), request)


@fuzz_settings(2000)
@given(st.randoms(use_true_random=False))
def test_finalize_states(rng: random.Random) -> None:
    m = _mutator(rng)
    request = m.finalize_request()
    outcome(lambda: serve_finalize(request), request)


@fuzz_settings(600)
@given(st.randoms(use_true_random=False))
def test_streams(rng: random.Random) -> None:
    m = _mutator(rng)
    messages = m.stream_requests()
    outcome(lambda: serve_stream(messages), messages[0])


@fuzz_settings(1500)
@given(
    dtype=st.integers(-1, 12),
    shape=st.lists(st.one_of(st.integers(0, 4), st.integers(-(2**63), 2**63 - 1)), max_size=70),
    data=st.binary(max_size=64),
)
def test_tensor_decoder(dtype: int, shape: list[int], data: bytes) -> None:
    tensor = pb.Tensor(shape=shape, data=data)
    tensor.dtype = dtype  # type: ignore[assignment]  # open enum: any int32 travels
    try:
        decoded = decode_request_tensors({"x": tensor}, CPU)
    except Exception as exc:  # noqa: BLE001
        assert status_for(exc).code == code_pb2.INVALID_ARGUMENT, traceback.format_exc()
        return
    assert decoded["x"].numel() * decoded["x"].element_size() == len(data)
