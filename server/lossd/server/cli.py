"""``lossd serve``: the command lossd-server adds to the ``lossd`` command (entry point group ``lossd.commands``).

    lossd serve [--host H] [--grpc-port P] [--http-port P] [--device auto|cpu|cuda[:N]] [--workers N] [--tls-cert ...]

``serve`` reads its settings from ``LOSSD_*`` environment variables, then
applies the flags given explicitly. The client commands (``eval``,
``finalize``, ``functions``) live in lossd-client (``lossd.client.cli``);
``main`` here is the whole ``lossd`` command, for ``python -m lossd.server``.
Heavy imports (torch, the app) happen only when ``serve`` runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from lossd.v1 import lossd_pb2 as pb

__all__ = ["main", "register", "add_serve_arguments", "serve_command", "local_catalogue"]

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Settings names the serve flags set (flags left out keep the environment's or the default).
SETTINGS_FLAGS = (
    "host",
    "grpc_port",
    "http_port",
    "device",
    "workers",
    "log_level",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "auth_tokens_file",
    "allow_insecure",
)


def _device(text: str) -> str:
    if not _DEVICE.match(text.strip().lower()):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text.strip().lower()


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The flags of ``lossd serve``; each flag's dest is a Settings field listed in SETTINGS_FLAGS."""
    serve.add_argument("--host", default=None, help="address to bind (env LOSSD_HOST; default 127.0.0.1)")
    serve.add_argument("--grpc-port", type=int, default=None, help="gRPC port, 0 for a free one (env LOSSD_GRPC_PORT; default 50051)")
    serve.add_argument(
        "--http-port", type=int, default=None, help="gateway, /metrics and dashboard port (env LOSSD_HTTP_PORT; default 8000)"
    )
    serve.add_argument("--device", type=_device, default=None, help="auto | cpu | cuda | cuda:N (env LOSSD_DEVICE; default auto)")
    serve.add_argument("--workers", type=int, default=None, help="gRPC worker processes sharing the port (env LOSSD_WORKERS; default 1)")
    serve.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default=None, help="(env LOSSD_LOG_LEVEL; default info)"
    )
    serve.add_argument("--tls-cert", dest="tls_cert_file", type=Path, default=None, help="PEM certificate chain (env LOSSD_TLS_CERT_FILE)")
    serve.add_argument("--tls-key", dest="tls_key_file", type=Path, default=None, help="PEM private key (env LOSSD_TLS_KEY_FILE)")
    serve.add_argument(
        "--tls-client-ca",
        dest="tls_client_ca_file",
        type=Path,
        default=None,
        help="require client certificates from this CA (env LOSSD_TLS_CLIENT_CA_FILE)",
    )
    serve.add_argument(
        "--auth-tokens-file", type=Path, default=None, help="bearer tokens, TOKEN or NAME:TOKEN per line (env LOSSD_AUTH_TOKENS_FILE)"
    )
    serve.add_argument(
        "--allow-insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback bind without TLS and tokens (env LOSSD_ALLOW_INSECURE)",
    )


def register(commands: Any) -> None:
    """Add ``serve`` to the ``lossd`` command (the ``lossd.commands`` entry point of lossd-server)."""
    serve = commands.add_parser("serve", help="run the gRPC server, HTTP gateway and /metrics in one process")
    add_serve_arguments(serve)
    serve.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    return serve_command({k: getattr(args, k) for k in SETTINGS_FLAGS if getattr(args, k, None) is not None})


def _fail(message: str, code: int, err: TextIO | None) -> int:
    print(f"lossd serve: {message}", file=err or sys.stderr)
    return code


def _setting_problem(loc: tuple[int | str, ...], message: str) -> str:
    """``grpc_port (LOSSD_GRPC_PORT): Input should be a valid integer``: the setting and its variable."""
    name = ".".join(str(x) for x in loc)
    return f"{name} (LOSSD_{str(loc[0]).upper()}): {message}" if loc else message


def serve_command(overrides: dict[str, Any], *, err: TextIO | None = None) -> int:
    """Build Settings from ``LOSSD_*`` variables and ``overrides`` (the flags given), then serve until a signal."""
    import asyncio
    import logging

    from pydantic import ValidationError

    from lossd.server.settings import Settings
    from lossd.server.unknown_settings import unknown_variable_warnings

    for line in unknown_variable_warnings(os.environ):  # a misspelt variable would leave its default silently
        print(f"lossd serve: warning: {line}", file=err or sys.stderr)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_setting_problem(e["loc"], e["msg"]) for e in exc.errors())
        return _fail(f"invalid settings: {problems}", EXIT_INVALID, err)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from lossd.server.security import check_bind

    try:
        check_bind(settings)  # an open public bind: one line and exit 2, before torch is imported
    except ValueError as exc:
        return _fail(str(exc), EXIT_INVALID, err)

    from lossd.kernels import select_device
    from lossd.server.app import serve
    from lossd.server.supervisor import WorkerStartError

    try:
        select_device(settings.device)  # cuda asked for where there is none: refuse now, not mid-start
    except ValueError as exc:
        return _fail(str(exc), EXIT_INVALID, err)
    try:
        asyncio.run(serve(settings))
    except OSError as exc:  # a port that cannot be bound: the message names the setting
        return _fail(str(exc), EXIT_INVALID, err)
    except ValueError as exc:  # unreadable certificates or token file
        return _fail(str(exc), EXIT_INVALID, err)
    except WorkerStartError as exc:
        return _fail(str(exc), EXIT_FAILURE, err)
    return EXIT_OK


def local_catalogue(family: str) -> pb.ListFunctionsResponse:
    """The local registry converted exactly as the server's ListFunctions does (for ``lossd functions`` without --server)."""
    from lossd.kernels import all_functions
    from lossd.server.convert import list_functions_response

    functions = all_functions()
    if family:
        families = sorted({f.family for f in functions})
        if family not in families:
            raise ValueError(f"family: expected one of {', '.join(families)}, got {family!r}")
        functions = [f for f in functions if f.family == family]
    response: pb.ListFunctionsResponse = list_functions_response(functions)
    return response


def main(argv: Sequence[str] | None = None) -> int:
    """The whole ``lossd`` command (client commands and ``serve``)."""
    from lossd.client.cli import main as lossd_main

    return lossd_main(argv)


if __name__ == "__main__":
    sys.exit(main())
