"""A stream's messages: the rules later messages follow, the wait for the next one, and the nan_policy field every request has."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from lossd.kernels.cancellation import DeadlineExceeded
from lossd.kernels.errors import FieldViolation, InvalidInput
from lossd.kernels.nan_policy import DEFAULT_NAN_POLICY, NAN_POLICIES
from lossd.v1 import lossd_pb2 as pb

__all__ = ["nan_policy_of", "check_stream_message", "next_message"]


def nan_policy_of(request: pb.EvaluateRequest, field: str = "nan_policy") -> str:
    """The request's nan_policy by name (UNSPECIFIED: the default); an unknown enum number is INVALID_ARGUMENT on ``field``."""
    value = int(request.nan_policy)
    if value == pb.NAN_POLICY_UNSPECIFIED:
        return DEFAULT_NAN_POLICY
    if value not in pb.NanPolicy.values():
        names = ", ".join(f"NAN_POLICY_{p.upper()}" for p in NAN_POLICIES)
        raise InvalidInput.single(field, f"expected one of {names} (or unset for {DEFAULT_NAN_POLICY}), got {value}")
    name: str = pb.NanPolicy.Name(value)
    return name.removeprefix("NAN_POLICY_").lower()


def check_stream_message(message: pb.EvaluateRequest, first: pb.EvaluateRequest, index: int) -> None:
    """Messages after the first repeat its stream-level fields or leave them unset, and never carry prior_states.

    The first message's functions, tags, nan_policy, return_state and
    request_id hold for the whole stream: a later message that sets one to
    something else would be ignored, so it is refused instead."""
    violations = [] if message is first else _changed_stream_fields(message, first, index)
    if message.prior_states:
        violations.append(
            FieldViolation(f"messages[{index}].prior_states", "prior_states are not accepted in a stream; use Finalize to merge states")
        )
    if violations:
        raise InvalidInput(violations)


def _changed_stream_fields(message: pb.EvaluateRequest, first: pb.EvaluateRequest, index: int) -> list[FieldViolation]:
    """The stream-level fields of a later ``message`` set to something other than the ``first`` message's."""
    where = f"messages[{index}]"
    changed: list[FieldViolation] = []
    if message.functions and list(message.functions) != list(first.functions):
        changed.append(FieldViolation(f"{where}.functions", "expected the functions of the first message (or none), got different ones"))
    if message.tags.ByteSize() and message.tags != first.tags:  # empty Tags count as unset
        changed.append(FieldViolation(f"{where}.tags", "expected the tags of the first message (or none), got different ones"))
    if message.nan_policy != pb.NAN_POLICY_UNSPECIFIED:
        expected = f"NAN_POLICY_{nan_policy_of(first).upper()}"
        value = int(message.nan_policy)
        got = pb.NanPolicy.Name(value) if value in pb.NanPolicy.values() else str(value)
        if got != expected:  # (UNSPECIFIED then PROPAGATE: the same policy)
            changed.append(
                FieldViolation(f"{where}.nan_policy", f"expected the nan_policy of the first message, {expected} (or unset), got {got}")
            )
    if message.return_state and not first.return_state:  # false is also proto3's unset
        changed.append(
            FieldViolation(f"{where}.return_state", "expected the return_state of the first message, false (or unset), got true")
        )
    if message.request_id and message.request_id != first.request_id:
        changed.append(
            FieldViolation(
                f"{where}.request_id",
                f"expected the request_id of the first message, {first.request_id[:64]!r} (or unset), got {message.request_id[:64]!r}",
            )
        )
    return changed


async def next_message(messages: AsyncIterator[pb.EvaluateRequest], idle_seconds: float) -> pb.EvaluateRequest | None:
    """The stream's next message (None: the client half-closed); DEADLINE_EXCEEDED when none comes within ``idle_seconds``.

    A client that opens a stream and then neither sends nor half-closes (and set
    no deadline) would hold its admission slot forever. Cancelling the pending
    read is safe: grpc.aio drops the completion of a cancelled read, and the
    abort that follows ends the call."""
    try:
        async with asyncio.timeout(idle_seconds):
            return await anext(messages)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise DeadlineExceeded(
            f"no stream message for {idle_seconds:g} s; the stream is ended (setting stream_idle_seconds, LOSSD_STREAM_IDLE_SECONDS)"
        ) from None
