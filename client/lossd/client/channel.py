"""gRPC channel options shared by the client and the server: large messages, transparent retries only, deadlines.

``GRPC_OPTIONS`` is the one definition of the HTTP/2 tuning; the server's
settings import it from here (the client never imports the server).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MiB", "GRPC_OPTIONS", "DEFAULT_TIMEOUT", "DEFAULT_ATTEMPTS", "RETRY_BUFFER_BYTES", "channel_options"]

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
# A call is tried at most this many times in all, and only as lossd.client.retries allows.
DEFAULT_ATTEMPTS = 5

# gRPC keeps a call's messages for its transparent retries while they fit in this buffer
# (lossd.client.streams replays a stream's within the same bound).
RETRY_BUFFER_BYTES = 64 * MiB


def channel_options(*, attempts: int = DEFAULT_ATTEMPTS, extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Return the client's channel options; ``extra`` options override any of them by name.

    The HTTP/2 tuning, no client-side size limits (the server enforces its
    own), and no gRPC retry policy: a policy retrying UNAVAILABLE would
    replay a request whose server died under it onto the next server (a
    query of death spreads). Retries are :mod:`lossd.client.retries`'s;
    gRPC's transparent retries stay on (``grpc.enable_retries``), since they
    resend only what no server processed. ``attempts`` is checked here
    (whatever its value, gRPC itself replays nothing a server may have seen).
    """
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise ValueError(f"expected attempts to be an integer >= 1, got {attempts!r}")
    options: dict[str, Any] = dict(GRPC_OPTIONS)
    options.update(
        {
            "grpc.max_send_message_length": -1,
            "grpc.max_receive_message_length": -1,
            "grpc.enable_retries": 1,
            "grpc.per_rpc_retry_buffer_size": RETRY_BUFFER_BYTES,
        }
    )
    for item in extra:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"expected channel options as (name, value) pairs, got {item!r}")
        options[item[0]] = item[1]
    return list(options.items())


# The full method names of Evaluate and EvaluateStream, for callables sending pre-serialized requests.
EVALUATE_METHOD = "/lossd.v1.LossService/Evaluate"
EVALUATE_STREAM_METHOD = "/lossd.v1.LossService/EvaluateStream"
