"""Hostile lossd.v1 requests: valid batches of catalogue functions, then a few random mutations.

One engine for both drivers: the hypothesis tests (in-process, through the
servicer's decoder and lossd.kernels) and the raw-gRPC fuzzer against a
running ``lossd serve`` (``make fuzz``).  It needs only numpy, the generated
messages and the catalogue as ListFunctions describes it, so fuzzing client
processes never import torch.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from catalogue_inputs import INPUTS, valid_inputs
from lossd.client.codec import encode_tensor
from lossd.v1 import lossd_pb2 as pb

__all__ = ["Mutator", "HOSTILE_NUMBERS"]

HOSTILE_NUMBERS = (
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    -1.0,
    1e300,
    -1e300,
    3e38,
    5e-324,
    2.0**53 + 1,
    2.0**63,
    2.0**64,
    -(2.0**63),
    1e30,
    0.5,
    1e6,
)
HOSTILE_INTS = (0, -1, 1, 2**31, 2**62, -(2**62), 2**63 - 1, -(2**63), 65, 1_000_000)
HOSTILE_STRINGS = ("", "x", "nan", "none", "classwise", "\x00", "é" * 10, "y" * 5000)


class Mutator:
    """Builds requests from ``catalogue`` (a ListFunctionsResponse) with a seeded ``random.Random``."""

    def __init__(self, catalogue: pb.ListFunctionsResponse, rng: random.Random) -> None:
        self.rng = rng
        self.np_rng = np.random.default_rng(rng.getrandbits(32))
        self.functions = {f.name: f for f in catalogue.functions if f.name in INPUTS}
        self.names = sorted(self.functions)
        self.states: list[pb.State] = []  # states the server returned: material for prior_states and Finalize

    # -- valid material ---------------------------------------------------------------------------
    def _valid_param(self, p: pb.ParamInfo) -> Any:
        if p.choices:
            return self.rng.choice(list(p.choices))
        default = _from_value(p.default)
        if p.type == "bool":
            return self.rng.random() < 0.5
        if p.type in ("int", "float") and default is not None and self.rng.random() < 0.5:
            scale = self.rng.choice((0.5, 2.0, 1.0))
            return type(default)(default * scale) if p.type == "float" else default
        return default

    def valid_spec(self, name: str, alias: str = "", vary: float = 0.3) -> pb.FunctionSpec:
        """A spec of ``name``; each parameter set to an allowed value with probability ``vary``."""
        info = self.functions[name]
        spec = pb.FunctionSpec(name=name, alias=alias)
        for p in info.params:
            if self.rng.random() < vary:
                value = self._valid_param(p)
                if value is not None:
                    spec.params.fields[p.name].CopyFrom(_to_value(value))
        return spec

    def valid_request(self, name: str | None = None, vary: float = 0.3) -> pb.EvaluateRequest:
        """A batch of ``name`` (a random function if None), with one or two specs of it.

        With ``vary=0`` the specs take the defaults and the request is valid; otherwise
        some parameters take other allowed values (which the data may not suit)."""
        name = name or self.rng.choice(self.names)
        arrays = valid_inputs(name, self.np_rng, self.rng.choice((1, 4, 12)) if vary else 12)
        functions = [self.valid_spec(name, vary=vary)]
        if self.rng.random() < 0.3:
            functions.append(self.valid_spec(name, alias=f"{name}_2", vary=vary))
        return pb.EvaluateRequest(
            tensors={k: encode_tensor(v, k) for k, v in arrays.items()},
            functions=functions,
            return_state=self.rng.random() < 0.7,
            request_id=f"fuzz-{self.rng.getrandbits(32):08x}",
        )

    # -- mutations --------------------------------------------------------------------------------
    def evaluate_request(self, max_mutations: int = 4, name: str | None = None) -> pb.EvaluateRequest:
        """A valid request (of ``name``, or a random function) with 0..max_mutations mutations."""
        request = self.valid_request(name)
        for _ in range(self.rng.randint(0, max_mutations)):
            self.rng.choice(self._request_mutations())(request)
        return request

    def stream_requests(self, max_mutations: int = 3) -> list[pb.EvaluateRequest]:
        """Two or three messages of one stream; later ones repeat or omit the functions."""
        first = self.valid_request()
        first.ClearField("prior_states")
        messages = [first]
        for _ in range(self.rng.randint(1, 2)):
            m = pb.EvaluateRequest()
            m.tensors.MergeFrom(first.tensors)
            if self.rng.random() < 0.3:
                m.functions.extend(first.functions)
            m.batch_id = self.rng.choice(("", "a", "b"))
            messages.append(m)
        for _ in range(self.rng.randint(0, max_mutations)):
            self.rng.choice(self._request_mutations())(self.rng.choice(messages))
        return messages

    def finalize_request(self, max_mutations: int = 3) -> pb.FinalizeRequest:
        request = pb.FinalizeRequest(return_state=self.rng.random() < 0.5, request_id="fuzz")
        if self.states:
            for _ in range(self.rng.randint(1, 3)):
                state = pb.State()
                state.CopyFrom(self.rng.choice(self.states))
                request.states.append(pb.NamedState(alias=self.rng.choice(("a", "a", "b", "")), state=state))
        for _ in range(self.rng.randint(0, max_mutations)):
            if request.states:
                self.mutate_state(self.rng.choice(request.states).state)
        return request

    def remember(self, response: pb.EvaluateResponse) -> None:
        """Keep some returned states (bounded) for later prior_states and Finalize requests."""
        for r in response.results:
            if r.HasField("state") and r.state.ByteSize() < 64 * 1024:
                if len(self.states) < 200:
                    self.states.append(r.state)
                else:
                    self.states[self.rng.randrange(200)] = r.state

    def _request_mutations(self) -> Sequence[Callable[[pb.EvaluateRequest], None]]:
        return (
            self._mutate_tensor,
            self._mutate_tensor,
            self._mutate_values,
            self._mutate_params,
            self._mutate_params,
            self._mutate_inputs,
            self._mutate_alias,
            self._add_prior_state,
            self._add_prior_state,
            self._mutate_misc,
        )

    def _pick_tensor(self, request: pb.EvaluateRequest) -> pb.Tensor | None:
        if not request.tensors:
            return None
        return request.tensors[self.rng.choice(sorted(request.tensors))]

    def _mutate_tensor(self, request: pb.EvaluateRequest) -> None:
        t = self._pick_tensor(request)
        if t is None:
            return
        mutate_tensor(self.rng, t)

    def _mutate_values(self, request: pb.EvaluateRequest) -> None:
        t = self._pick_tensor(request)
        if t is None or t.dtype not in _NUMPY or not t.data or len(t.data) % _NUMPY[t.dtype].itemsize:
            return
        dtype = _NUMPY[t.dtype]
        array = np.frombuffer(t.data, dtype=dtype).copy()
        index = self.rng.randrange(array.size) if self.rng.random() < 0.7 else slice(None)
        with np.errstate(all="ignore"):  # 1e300 into float16 is meant to overflow
            if dtype.kind == "f":
                array[index] = np.array(self.rng.choice(HOSTILE_NUMBERS)).astype(dtype)
            elif dtype.kind in "iu":
                array[index] = _clip(self.rng, dtype)
            else:
                array.view(np.uint8)[index] = self.rng.choice((2, 255))
        t.data = array.tobytes()

    def _mutate_params(self, request: pb.EvaluateRequest) -> None:
        if not request.functions:
            return
        spec = self.rng.choice(request.functions)
        info = self.functions.get(spec.name)
        names = [p.name for p in info.params] if info else []
        name = self.rng.choice(names) if names and self.rng.random() < 0.85 else self.rng.choice(("bogus", "", "n_bins", "y" * 300))
        spec.params.fields[name].CopyFrom(hostile_value(self.rng))

    def _mutate_inputs(self, request: pb.EvaluateRequest) -> None:
        if not request.functions:
            return
        spec = self.rng.choice(request.functions)
        info = self.functions.get(spec.name)
        roles = [r.name for r in info.roles] if info else ["logits"]
        role = self.rng.choice([*roles, "bogus", ""])
        spec.inputs[role] = self.rng.choice([*sorted(request.tensors), "missing", ""])

    def _mutate_alias(self, request: pb.EvaluateRequest) -> None:
        if not request.functions:
            return
        choice = self.rng.random()
        if choice < 0.4:
            request.functions.append(request.functions[0])  # duplicate alias
        elif choice < 0.7:
            self.rng.choice(request.functions).alias = self.rng.choice(HOSTILE_STRINGS)
        elif choice < 0.85:
            self.rng.choice(request.functions).name = self.rng.choice(("", "no_such", "ce", "y" * 300, *self.names))
        else:
            del request.functions[:]

    def _add_prior_state(self, request: pb.EvaluateRequest) -> None:
        if not request.functions or not self.states:
            return
        alias = self.rng.choice([f.alias or f.name for f in request.functions] + ["unmatched"])
        same = [s for s in self.states if s.function == request.functions[0].name]
        state = pb.State()
        state.CopyFrom(self.rng.choice(same) if same and self.rng.random() < 0.8 else self.rng.choice(self.states))
        if self.rng.random() < 0.7:
            self.mutate_state(state)
        request.prior_states[alias].CopyFrom(state)

    def _mutate_misc(self, request: pb.EvaluateRequest) -> None:
        choice = self.rng.random()
        if choice < 0.25:
            request.batch_id = self.rng.choice(HOSTILE_STRINGS)
        elif choice < 0.5:
            request.request_id = self.rng.choice(HOSTILE_STRINGS)
        elif choice < 0.75:
            request.tags.model = self.rng.choice(HOSTILE_STRINGS)
            request.tags.dataset = self.rng.choice(HOSTILE_STRINGS)
        else:
            name = self.rng.choice(("", "extra", "y" * 300))
            request.tensors[name].CopyFrom(encode_tensor(np.zeros(self.rng.choice((0, 1, 3))), "x"))

    def mutate_state(self, state: pb.State) -> None:
        """One mutation of a state: its identity, its fields' presence, dtypes, shapes or values."""
        choice = self.rng.random()
        names = sorted(state.fields)
        if choice < 0.1:
            state.function = self.rng.choice([*self.names, "", "no_such", "ce"])
        elif choice < 0.17:
            state.version = self.rng.choice((0, 2, 2**32 - 1))
        elif choice < 0.27:
            state.params_json = self.rng.choice(
                ("", "{", "[]", "null", '{"bins": NaN}', '{"n_bins": 1e400}', '{"x": 1}', "[" * 5000, json.dumps({"reduction": "none"}))
            )
        elif choice < 0.33:
            state.batches = self.rng.choice((0, 2**40, 2**63, 2**64 - 1))
        elif choice < 0.43 and names:
            del state.fields[self.rng.choice(names)]
        elif choice < 0.5:
            state.fields[self.rng.choice(("bogus", "matrix", "bins", "weight", "scores"))].CopyFrom(encode_tensor(np.zeros(2), "x"))
        elif names:
            t = state.fields[self.rng.choice(names)]
            if self.rng.random() < 0.5:
                mutate_tensor(self.rng, t)
            else:
                value = self.rng.choice(HOSTILE_NUMBERS)
                shape = self.rng.choice(((), (0,), (3,), (2, 2), (5000, 2), (4, 4)))
                t.CopyFrom(encode_tensor(np.full(shape, value, dtype=np.float64), "x"))


def mutate_tensor(rng: random.Random, t: pb.Tensor) -> None:
    """One mutation of a wire tensor's dtype, shape or bytes."""
    choice = rng.random()
    shape = list(t.shape)
    if choice < 0.15:
        t.dtype = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 99, 2**31 - 1))  # type: ignore[assignment]
    elif choice < 0.3:
        del t.shape[:]
        t.shape.extend(shape + [1] * rng.choice((1, 2, 40, 63, 64, 65, 100)))
    elif choice < 0.45 and shape:
        shape[rng.randrange(len(shape))] = rng.choice((0, -1, 2**31, 2**62, 2**63 - 1, -(2**63), 3))
        del t.shape[:]
        t.shape.extend(shape)
    elif choice < 0.55:
        del t.shape[:]
        t.shape.extend(rng.choice(([0, 2**40, 2**40], [0, 2**62], [0] * 64, [], [2**32, 2**32], [1, 0, 2**31 - 1])))
    elif choice < 0.7:
        t.data = t.data[: rng.randrange(len(t.data) + 1)]
    elif choice < 0.8:
        t.data = t.data + bytes(rng.choice((1, 4, 8)))
    elif choice < 0.9:
        t.data = bytes(rng.getrandbits(8) for _ in range(len(t.data)))  # any bit pattern: NaNs, infinities, huge indices
    else:
        del t.shape[:]
        t.shape.extend(shape[::-1] if rng.random() < 0.5 else shape[:-1])


def hostile_value(rng: random.Random, depth: int = 0) -> struct_pb2.Value:
    """A JSON value (NaN and ±Infinity included) for a parameter."""
    v = struct_pb2.Value()
    choice = rng.random()
    if choice < 0.45:
        v.number_value = rng.choice(HOSTILE_NUMBERS + tuple(float(i) for i in HOSTILE_INTS))
    elif choice < 0.6:
        v.string_value = rng.choice(HOSTILE_STRINGS)
    elif choice < 0.7:
        v.bool_value = rng.random() < 0.5
    elif choice < 0.8:
        v.null_value = struct_pb2.NULL_VALUE
    elif choice < 0.81 and depth == 0:  # nested about as deep as protobuf parses (100 message levels, ~32 JSON objects)
        v.CopyFrom(deep_value(rng.choice((10, 25, 32))))
    elif choice < 0.9 and depth < 3:
        v.list_value.values.extend(hostile_value(rng, depth + 1) for _ in range(rng.choice((0, 1, 3, 20))))
    elif depth < 3:
        v.struct_value.fields["k"].CopyFrom(hostile_value(rng, depth + 1))
    # else: an empty Value (no kind set)
    return v


def deep_value(depth: int) -> struct_pb2.Value:
    """A Value of objects nested ``depth`` deep."""
    v = struct_pb2.Value(number_value=1.0)
    for _ in range(depth):
        outer = struct_pb2.Value()
        outer.struct_value.fields["k"].CopyFrom(v)
        v = outer
    return v


_NUMPY = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
    pb.UINT8: np.dtype("u1"),
    pb.BOOL: np.dtype("?"),
}


def _clip(rng: random.Random, dtype: np.dtype) -> int:
    info = np.iinfo(dtype)
    return int(np.clip(rng.choice(HOSTILE_INTS), info.min, info.max))


def _from_value(v: struct_pb2.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        return int(v.number_value) if v.number_value.is_integer() else v.number_value
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "list_value":
        return [_from_value(x) for x in v.list_value.values]
    return None


def _to_value(value: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    if isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, (int, float)):
        v.number_value = float(value)
    elif isinstance(value, str):
        v.string_value = value
    elif isinstance(value, (list, tuple)):
        v.list_value.values.extend(_to_value(x) for x in value)
    else:
        v.null_value = struct_pb2.NULL_VALUE
    return v
