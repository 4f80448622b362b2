"""The ``lossd`` command: ``serve``, ``eval``, ``finalize`` and ``functions``.

    lossd serve [--host H] [--grpc-port P] [--http-port P] [--device auto|cpu|cuda[:N]]
    lossd eval --server HOST:PORT --inputs batch.npz --fn cross_entropy --fn "ece:n_bins=15" [--json]
    lossd finalize --server HOST:PORT STATE_FILE... [--tag KEY=VALUE] [--json]
    lossd functions [--server HOST:PORT] [--family F] [--json]

``serve`` reads its settings from ``LOSSD_*`` environment variables, then
applies the flags given explicitly. ``eval`` exits 2 on an invalid argument
(the server's field violations go to stderr) and 1 on any other failure.
Heavy imports (torch, the server) happen only in the commands that need them,
so ``lossd eval`` starts as fast as the client does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main", "build_parser", "serve_command", "eval_command", "finalize_command", "functions_command"]

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2
DEFAULT_SERVER = "127.0.0.1:50051"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _device(text: str) -> str:
    if not _DEVICE.match(text.strip().lower()):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text.strip().lower()


def _tag(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or key not in ("model", "dataset", "split"):
        raise argparse.ArgumentTypeError(f"expected model=NAME, dataset=NAME or split=NAME, got {text!r}")
    return key, value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lossd", description="lossd: a loss-evaluation service.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server, HTTP gateway and /metrics in one process")
    serve.add_argument("--host", default=None, help="address to bind (env LOSSD_HOST; default 127.0.0.1)")
    serve.add_argument("--grpc-port", type=int, default=None, help="gRPC port, 0 for a free one (env LOSSD_GRPC_PORT; default 50051)")
    serve.add_argument(
        "--http-port", type=int, default=None, help="gateway, /metrics and dashboard port (env LOSSD_HTTP_PORT; default 8000)"
    )
    serve.add_argument("--device", type=_device, default=None, help="auto | cpu | cuda | cuda:N (env LOSSD_DEVICE; default auto)")
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

    ev = commands.add_parser("eval", help="evaluate functions on the arrays of an .npz file")
    ev.add_argument("--server", default=DEFAULT_SERVER, help=f"gRPC address HOST:PORT (default {DEFAULT_SERVER})")
    ev.add_argument("--inputs", type=Path, required=True, help="an .npz file; its arrays are tensors named by their keys")
    ev.add_argument(
        "--fn",
        dest="specs",
        action="append",
        required=True,
        metavar="SPEC",
        help='a function: NAME, "NAME:param=value,..." or a JSON object; repeat for more',
    )
    ev.add_argument(
        "--tag",
        dest="tags",
        type=_tag,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="monitoring label: model=..., dataset=..., split=...",
    )
    ev.add_argument("--json", dest="as_json", action="store_true", help='print one JSON object {"results": ..., "diagnostics": [...]}')
    ev.add_argument("--timeout", type=_positive, default=60.0, help="deadline in seconds (default 60)")

    fz = commands.add_parser("finalize", help="merge state files written by ranks or shards (save_states) and print the values")
    fz.add_argument("files", nargs="+", type=Path, metavar="STATE_FILE", help="files written by lossd.client.distributed.save_states")
    fz.add_argument("--server", default=DEFAULT_SERVER, help=f"gRPC address HOST:PORT (default {DEFAULT_SERVER})")
    fz.add_argument(
        "--tag",
        dest="tags",
        type=_tag,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="monitoring label (default: the files' tags)",
    )
    fz.add_argument("--json", dest="as_json", action="store_true", help='print one JSON object {"results": ..., "diagnostics": [...]}')
    fz.add_argument("--timeout", type=_positive, default=60.0, help="deadline in seconds (default 60)")

    fn = commands.add_parser("functions", help="list the functions: roles, parameters, outputs, splittability")
    fn.add_argument("--server", default=None, help="ask this server (HOST:PORT) instead of reading the local registry")
    fn.add_argument("--family", default="", help="only this family (regression, binary, classification, ...)")
    fn.add_argument("--json", dest="as_json", action="store_true", help="print the ListFunctions response as JSON")
    fn.add_argument("--timeout", type=_positive, default=60.0, help="deadline in seconds when asking a server (default 60)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _dispatch(build_parser().parse_args(argv))
    except BrokenPipeError:  # `lossd functions | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


_SECURITY_FLAGS = ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file", "allow_insecure")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        names = ("host", "grpc_port", "http_port", "device", "log_level", *_SECURITY_FLAGS)
        overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
        return serve_command(overrides)
    if args.command == "eval":
        return eval_command(args.server, args.inputs, args.specs, dict(args.tags), as_json=args.as_json, timeout=args.timeout)
    if args.command == "finalize":
        return finalize_command(args.server, args.files, dict(args.tags), as_json=args.as_json, timeout=args.timeout)
    return functions_command(args.server, args.family, as_json=args.as_json, timeout=args.timeout)


def _fail(command: str, message: str, code: int, err: TextIO | None) -> int:
    print(f"lossd {command}: {message}", file=err or sys.stderr)
    return code


# -- serve -------------------------------------------------------------------------------------


def serve_command(overrides: dict[str, Any], *, err: TextIO | None = None) -> int:
    """Build Settings from ``LOSSD_*`` variables and ``overrides`` (the flags given), then serve until a signal."""
    import asyncio
    import logging

    from pydantic import ValidationError

    from lossd.server.settings import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _fail("serve", f"invalid settings: {problems}", EXIT_INVALID, err)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from lossd.server.security import check_bind

    try:
        check_bind(settings)  # an open public bind: one line and exit 2, before torch is imported
    except ValueError as exc:
        return _fail("serve", str(exc), EXIT_INVALID, err)

    from lossd.kernels import select_device
    from lossd.server.app import serve

    try:
        select_device(settings.device)  # cuda asked for where there is none: refuse now, not mid-start
    except ValueError as exc:
        return _fail("serve", str(exc), EXIT_INVALID, err)
    try:
        asyncio.run(serve(settings))
    except OSError as exc:  # a port that cannot be bound
        return _fail("serve", str(exc), EXIT_FAILURE, err)
    except ValueError as exc:  # unreadable certificates or token file
        return _fail("serve", str(exc), EXIT_INVALID, err)
    return EXIT_OK


# -- eval --------------------------------------------------------------------------------------


def _load_npz(path: Path) -> dict[str, Any]:
    import numpy as np

    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"expected an .npz archive of named arrays, got a single array in {path}")
    with data:
        return {name: data[name] for name in data.files}


def eval_command(
    server: str,
    inputs: Path,
    specs: Sequence[str],
    tags: dict[str, str],
    *,
    as_json: bool = False,
    timeout: float = 60.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Evaluate ``specs`` on the arrays of ``inputs`` and print the results."""
    from lossd.client import Client, InvalidArgumentError, LossdError, SpecError, TensorError
    from lossd.client.messages import function_specs

    try:
        tensors = _load_npz(inputs)
        functions = function_specs(list(specs))
    except (OSError, ValueError) as exc:  # no such file, not an npz, object arrays, a bad spec
        return _fail("eval", str(exc), EXIT_INVALID, err)
    try:
        with Client(server, timeout=timeout) as client:
            result = client.evaluate(tensors, functions, tags=tags or None)
    except (SpecError, TensorError) as exc:
        return _fail("eval", str(exc), EXIT_INVALID, err)
    except LossdError as exc:
        violations = getattr(exc, "violations", [])
        lines = [str(exc), *(f"  {v.field}: {v.description}" for v in violations)]
        return _fail("eval", "\n".join(lines), EXIT_INVALID if isinstance(exc, InvalidArgumentError) else EXIT_FAILURE, err)
    if as_json:
        print(json.dumps(result.to_json(), allow_nan=False), file=out or sys.stdout)
    else:
        _print_table(result, out or sys.stdout)
    return EXIT_OK


def _number(x: float) -> str:
    return f"{x:.8g}"


def _print_table(result: Any, out: TextIO) -> None:
    rows: list[tuple[str, str, str]] = []
    for alias, r in result.items():
        denominator = f"{_number(r.denominator)} {r.denominator_kind}".strip() if r.denominator is not None else ""
        names = sorted(r.values, key=lambda k: (k != "value", k))
        for name in names:
            rows.append((alias if name == "value" else f"{alias}.{name}", _number(r.values[name]), denominator if name == "value" else ""))
        for name, t in sorted(r.tensors.items()):
            label = alias if name == "value" else f"{alias}.{name}"
            rows.append((label, f"tensor {list(t.shape)} (see --json)", denominator if name == "value" and not names else ""))
    header = ("function", "value", "denominator")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)
    if result.diagnostics:
        print("\ndiagnostics:", file=out)
        for d in result.diagnostics:
            where = f" [{d.function}]" if d.function else ""
            count = f" (x{d.count})" if d.count > 1 else ""
            print(f"  {d.severity}: {d.code}{where}{count}: {d.message}", file=out)


# -- finalize ----------------------------------------------------------------------------------


def finalize_command(
    server: str,
    files: Sequence[Path],
    tags: dict[str, str],
    *,
    as_json: bool = False,
    timeout: float = 60.0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Merge the states of ``files`` (one per rank or shard) with one Finalize call and print the values."""
    from lossd.client import InvalidArgumentError, LossdError
    from lossd.client.distributed import finalize_files

    try:
        result = finalize_files(server, files, tags=tags or None, timeout=timeout)
    except LossdError as exc:
        violations = getattr(exc, "violations", [])
        lines = [str(exc), *(f"  {v.field}: {v.description}" for v in violations)]
        return _fail("finalize", "\n".join(lines), EXIT_INVALID if isinstance(exc, InvalidArgumentError) else EXIT_FAILURE, err)
    except (OSError, ValueError) as exc:  # no such file, not a state file, files of different functions or tags, no states
        return _fail("finalize", str(exc), EXIT_INVALID, err)
    if as_json:
        print(json.dumps(result.to_json(), allow_nan=False), file=out)
    else:
        _print_table(result, out)
    return EXIT_OK


# -- functions ---------------------------------------------------------------------------------


def _local_catalogue(family: str) -> Any:
    """Convert the local registry exactly as the server's ListFunctions does."""
    from lossd.kernels import all_functions
    from lossd.server.convert import list_functions_response

    functions = all_functions()
    if family:
        families = sorted({f.family for f in functions})
        if family not in families:
            raise ValueError(f"family: expected one of {', '.join(families)}, got {family!r}")
        functions = [f for f in functions if f.family == family]
    return list_functions_response(functions)


def functions_command(
    server: str | None,
    family: str = "",
    *,
    as_json: bool = False,
    timeout: float = 60.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the catalogue of ``server``, or of the local registry when ``server`` is None."""
    from lossd.client import Client, InvalidArgumentError, LossdError
    from lossd.client.results import catalogue_to_json

    try:
        if server is None:
            catalogue = _local_catalogue(family)
        else:
            with Client(server, timeout=timeout) as client:
                catalogue = client.list_functions(family)
    except ValueError as exc:
        return _fail("functions", str(exc), EXIT_INVALID, err)
    except LossdError as exc:
        return _fail("functions", str(exc), EXIT_INVALID if isinstance(exc, InvalidArgumentError) else EXIT_FAILURE, err)
    if as_json:
        print(json.dumps(catalogue_to_json(catalogue), indent=2), file=out or sys.stdout)
    else:
        _print_catalogue(catalogue, out or sys.stdout)
    return EXIT_OK


def _json_value(value: Any, kind: str) -> str:
    from google.protobuf import json_format

    obj = json_format.MessageToDict(value)
    if kind == "int" and isinstance(obj, float) and obj.is_integer():  # JSON numbers are doubles on the wire
        obj = int(obj)
    return json.dumps(obj)


def _print_catalogue(catalogue: Any, out: TextIO) -> None:
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
            print(f"  {d.code} ({_severity(d.severity)}): {d.meaning}", file=out)


def _severity(value: int) -> str:
    from lossd.v1 import lossd_pb2 as pb

    return pb.Severity.Name(value).lower()


if __name__ == "__main__":
    sys.exit(main())
