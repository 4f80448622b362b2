"""gRPC channel options shared by the client and the server: large messages, retries, deadlines.

``GRPC_OPTIONS`` is the one definition of the HTTP/2 tuning; the server's
settings import it from here (the client never imports the server).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lossd.v1 import lossd_pb2 as pb

__all__ = ["MiB", "GRPC_OPTIONS", "DEFAULT_TIMEOUT", "DEFAULT_ATTEMPTS", "RETRY_BUFFER_BYTES", "service_config", "channel_options"]

MiB = 1 << 20

# HTTP/2 tuned for large tensors. Measured on loopback: default Python gRPC
# moves 0.2–0.4 GB/s for a 16 MB message; larger frames and write buffers
# about 0.9 GB/s (bench/bench_wire.py prints the figure on this machine).
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.max_frame_size", 16 * MiB - 1),  # the HTTP/2 maximum, 2^24 − 1
    ("grpc.http2.write_buffer_size", 64 * MiB),
    ("grpc.http2.lookahead_bytes", 64 * MiB),
    ("grpc.http2.bdp_probe", 1),
]

DEFAULT_TIMEOUT = 60.0  # seconds: the deadline of every call unless the caller gives another
DEFAULT_ATTEMPTS = 5  # calls answered UNAVAILABLE are tried up to this many times in all (gRPC caps it at 5)

# gRPC retries a call only while the messages it sent fit in this buffer: a
# request larger than this is sent once (a retry would need it buffered).
RETRY_BUFFER_BYTES = 64 * MiB

_SERVICE = pb.DESCRIPTOR.services_by_name["LossService"].full_name


def service_config(attempts: int = DEFAULT_ATTEMPTS) -> dict[str, Any]:
    """Return the gRPC service config: retry UNAVAILABLE (and overloaded answers) with backoff, ``attempts`` tries in all."""
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ValueError(f"expected attempts to be an integer >= 1, got {attempts!r}")
    method: dict[str, Any] = {"name": [{"service": _SERVICE}]}
    if attempts > 1:  # gRPC refuses a retry policy with maxAttempts < 2
        method["retryPolicy"] = {
            "maxAttempts": attempts,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            # RESOURCE_EXHAUSTED is retried only as the server's grpc-retry-pushback-ms says: after
            # the jittered hint of an overloaded replica, never for a request over a budget.
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        }
    return {"methodConfig": [method]}


def channel_options(*, attempts: int = DEFAULT_ATTEMPTS, extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Return the client's channel options; ``extra`` options override any of them by name.

    The HTTP/2 tuning, no client-side size limits (the server enforces its
    own) and the retry policy.
    """
    options: dict[str, Any] = dict(GRPC_OPTIONS)
    options.update(
        {
            "grpc.max_send_message_length": -1,
            "grpc.max_receive_message_length": -1,
            "grpc.enable_retries": 1 if attempts > 1 else 0,
            "grpc.per_rpc_retry_buffer_size": RETRY_BUFFER_BYTES,
            "grpc.service_config": json.dumps(service_config(attempts)),
        }
    )
    for item in extra:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"expected channel options as (name, value) pairs, got {item!r}")
        options[item[0]] = item[1]
    return list(options.items())


# The full method name of Evaluate, for callables sending pre-serialized requests.
EVALUATE_METHOD = "/lossd.v1.LossService/Evaluate"
