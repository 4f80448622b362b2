"""What the client commands share: exit codes, argument types, the connection flags and the client they open."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lossd.client.client import Client
from lossd.client.settings import DEFAULT_ADDRESS, ClientSettings

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_INVALID",
    "DEFAULT_SERVER",
    "Commands",
    "tag",
    "positive_seconds",
    "add_connection_arguments",
    "add_tag_argument",
    "add_output_arguments",
    "connection_settings",
    "connect",
]

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2
DEFAULT_SERVER = DEFAULT_ADDRESS

# The object ``add_subparsers()`` returns; each command module registers its parser on it.
Commands = Any


def tag(text: str) -> tuple[str, str]:
    """Parse ``KEY=VALUE`` for ``--tag`` (model, dataset or split)."""
    key, eq, value = text.partition("=")
    if not eq or key not in ("model", "dataset", "split"):
        raise argparse.ArgumentTypeError(f"expected model=NAME, dataset=NAME or split=NAME, got {text!r}")
    return key, value


def positive_seconds(text: str) -> float:
    """Parse a number of seconds > 0 for ``--timeout``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_connection_arguments(parser: argparse.ArgumentParser, *, server_help: str | None = None) -> None:
    """``--server`` and the TLS and token flags; each defaults to its ``LOSSD_*`` variable."""
    parser.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT",
        help=server_help or f"gRPC address HOST:PORT (env LOSSD_SERVER; default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--tls-ca", type=Path, default=None, help="PEM roots that sign the server's certificate; turns TLS on (env LOSSD_TLS_CA_FILE)"
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=None, help="PEM client certificate, for mutual TLS (env LOSSD_TLS_CLIENT_CERT_FILE)"
    )
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="PEM key of --tls-cert (env LOSSD_TLS_CLIENT_KEY_FILE)")
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="file holding the bearer token (env LOSSD_TOKEN_FILE, or the token in LOSSD_TOKEN)",
    )
    parser.add_argument("--timeout", type=positive_seconds, default=60.0, help="deadline in seconds (default 60)")


def add_tag_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--tag KEY=VALUE``, repeatable."""
    parser.add_argument("--tag", dest="tags", type=tag, action="append", default=[], metavar="KEY=VALUE", help=help)


def add_output_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """``--json``."""
    parser.add_argument("--json", dest="as_json", action="store_true", help=help)


def connection_settings(args: argparse.Namespace) -> ClientSettings:
    """The environment's settings with the flags given applied (raises ValueError on a bad combination)."""
    return ClientSettings.from_environment(
        address=args.server, ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key, token_file=args.token_file
    )


def connect(settings: ClientSettings, timeout: float) -> Client:
    """Open a client with ``settings``."""
    return Client(settings=settings, timeout=timeout)
