"""lossd.client: the thin lossd client (numpy + grpcio + protobuf; torch optional, never imported here).

    from lossd.client import Client

    with Client("localhost:50051") as client:
        out = client.evaluate({"logits": logits, "labels": labels}, ["cross_entropy", "ece:n_bins=15"])
        print(out["cross_entropy"].value, out.to_json())

        run = client.run(["cross_entropy", "accuracy"], tags={"model": "m", "dataset": "d", "split": "validation"})
        for batch in loader:
            run.update(batch)
        run.result()

Failures raise the exceptions of :mod:`lossd.client.errors`. Where the server
is and how to reach it (TLS, tokens) defaults to the ``LOSSD_*`` variables
read by :class:`lossd.client.settings.ClientSettings`.
"""

from importlib.metadata import version as _version

from lossd.client.aio import AsyncClient
from lossd.client.channel import DEFAULT_TIMEOUT, GRPC_OPTIONS
from lossd.client.client import Client
from lossd.client.codec import TensorError, decode_tensor, encode_tensor
from lossd.client.errors import *  # noqa: F403  (the hierarchy is part of this package's API)
from lossd.client.errors import __all__ as _errors_all
from lossd.client.evaluation import Diagnostic, EvaluationResult, FunctionResult
from lossd.client.local_sends import StillSending
from lossd.client.messages import DEFAULT_CHUNK_BYTES
from lossd.client.run import AsyncRun, Run
from lossd.client.settings import ClientSettings
from lossd.client.specs import SpecError, parse_spec

__all__ = [
    "AsyncClient",
    "AsyncRun",
    "Client",
    "ClientSettings",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_TIMEOUT",
    "Diagnostic",
    "EvaluationResult",
    "FunctionResult",
    "GRPC_OPTIONS",
    "Run",
    "SpecError",
    "StillSending",
    "TensorError",
    "decode_tensor",
    "encode_tensor",
    "parse_spec",
    "__version__",
    *_errors_all,
]

__version__: str = _version("lossd-client")  # the one version attribute: the installed distribution's
