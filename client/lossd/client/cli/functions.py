"""``lossd functions``: the catalogue (roles, parameters, outputs, splittability) of a server or of the local registry.

The local registry is read only where lossd-kernels and lossd-server are
installed (it is converted exactly as the server's ListFunctions does);
elsewhere the command asks for ``--server`` in one line. ``--server``,
``LOSSD_SERVER`` or any TLS or token flag means a server is asked instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, TextIO

from google.protobuf import json_format

from lossd.client.cli.common import (
    EXIT_INVALID,
    EXIT_OK,
    Commands,
    add_connection_arguments,
    add_output_arguments,
    connect,
    connection_settings,
)
from lossd.client.cli.output import fail, fail_call
from lossd.client.errors import LossdError
from lossd.client.results import catalogue_to_json
from lossd.client.settings import ClientSettings, configured_address
from lossd.v1 import lossd_pb2 as pb

__all__ = ["register", "run", "functions_command", "local_catalogue"]

NO_LOCAL_REGISTRY = "reading the local registry needs lossd-kernels and lossd-server installed; pass --server HOST:PORT to ask a server"


def register(commands: Commands) -> None:
    """Add the ``functions`` parser."""
    parser: argparse.ArgumentParser = commands.add_parser("functions", help="list the functions: roles, parameters, outputs, splittability")
    parser.add_argument("--family", default="", help="only this family (regression, binary, classification, ...)")
    add_output_arguments(parser, "print the ListFunctions response as JSON")
    add_connection_arguments(parser, server_help="ask this server (HOST:PORT; env LOSSD_SERVER) instead of reading the local registry")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lossd functions`` with parsed arguments."""
    settings: ClientSettings | None = None
    connection_flags = (args.server, args.tls_ca, args.tls_cert, args.tls_key, args.token_file)
    if any(flag is not None for flag in connection_flags) or configured_address() is not None:  # a server was meant
        try:
            settings = connection_settings(args)
        except ValueError as exc:
            return fail("functions", str(exc), EXIT_INVALID)
    return functions_command(settings, args.family, as_json=args.as_json, timeout=args.timeout)


class NoLocalRegistry(RuntimeError):
    """lossd-kernels or lossd-server is not installed here."""


def local_catalogue(family: str) -> pb.ListFunctionsResponse:
    """The local registry as the server's ListFunctions response (raises NoLocalRegistry where it cannot be read)."""
    try:
        server_cli = importlib.import_module("lossd.server.cli")  # imported by name: the client never depends on the server
        response: pb.ListFunctionsResponse = server_cli.local_catalogue(family)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[:2] in (["lossd", "kernels"], ["lossd", "server"]):
            raise NoLocalRegistry(NO_LOCAL_REGISTRY) from None
        raise
    return response


def functions_command(
    settings: ClientSettings | None,
    family: str = "",
    *,
    as_json: bool = False,
    timeout: float = 60.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the catalogue of the server of ``settings``, or of the local registry when ``settings`` is None."""
    try:
        if settings is None:
            catalogue = local_catalogue(family)
        else:
            with connect(settings, timeout) as client:
                catalogue = client.list_functions(family)
    except (ValueError, NoLocalRegistry) as exc:
        return fail("functions", str(exc), EXIT_INVALID, err)
    except LossdError as exc:
        return fail_call("functions", exc, err)
    if as_json:
        print(json.dumps(catalogue_to_json(catalogue), indent=2), file=out or sys.stdout)
    else:
        print_catalogue(catalogue, out or sys.stdout)
    return EXIT_OK


def _json_value(value: Any, kind: str) -> str:
    obj = json_format.MessageToDict(value)
    if kind == "int" and isinstance(obj, float) and obj.is_integer():  # JSON numbers are doubles on the wire
        obj = int(obj)
    return json.dumps(obj)


def print_catalogue(catalogue: pb.ListFunctionsResponse, out: TextIO) -> None:
    """Print every function (roles, params, outputs, reference), then the diagnostic codes."""
    for f in catalogue.functions:
        aliases = f"; aliases: {', '.join(f.aliases)}" if f.aliases else ""
        split = "splittable" if f.splittable else "not splittable (whole batches only)"
        print(f"{f.name}  ({f.family}, {split}{aliases})", file=out)
        print(f"    {f.summary}", file=out)
        for r in f.roles:
            print(f"    role   {r.name}: {r.shape} {r.dtype}{' (optional)' if r.optional else ''}: {r.doc}", file=out)
        for p in f.params:
            bounds = f" in {p.range}" if p.range and not p.choices else ""
            choices = f" one of {{{', '.join(p.choices)}}}" if p.choices else ""
            nullable = " (nullable)" if p.nullable else ""
            print(f"    param  {p.name}: {p.type} = {_json_value(p.default, p.type)}{bounds}{choices}{nullable}: {p.doc}", file=out)
        for o in f.outputs:
            print(f"    output {o.name}{' (tensor)' if o.tensor else ''}: {o.doc}", file=out)
        print(f"    reference: {f.reference}", file=out)
    if catalogue.diagnostics:
        print("\ndiagnostic codes:", file=out)
        for d in catalogue.diagnostics:
            print(f"  {d.code} ({pb.Severity.Name(d.severity).lower()}): {d.meaning}", file=out)
