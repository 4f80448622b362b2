"""``lossd eval``: evaluate functions on the arrays of an .npz file.

Exits 2 on an invalid argument (the server's field violations go to stderr)
and 1 on any other failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from lossd.client.cli.common import (
    EXIT_INVALID,
    EXIT_OK,
    Commands,
    add_connection_arguments,
    add_output_arguments,
    add_tag_argument,
    connect,
    connection_settings,
)
from lossd.client.cli.output import fail, fail_call, print_results
from lossd.client.codec import TensorError
from lossd.client.errors import LossdError
from lossd.client.messages import function_specs
from lossd.client.settings import ClientSettings
from lossd.client.specs import SpecError

__all__ = ["register", "run", "eval_command", "load_npz"]


def register(commands: Commands) -> None:
    """Add the ``eval`` parser."""
    parser: argparse.ArgumentParser = commands.add_parser("eval", help="evaluate functions on the arrays of an .npz file")
    parser.add_argument("--inputs", type=Path, required=True, help="an .npz file; its arrays are tensors named by their keys")
    parser.add_argument(
        "--array",
        dest="arrays",
        action="append",
        metavar="NAME",
        help="send only this array of the file; repeat for more (default: every array, and the server refuses one that no function reads)",
    )
    parser.add_argument(
        "--fn",
        dest="specs",
        action="append",
        required=True,
        metavar="SPEC",
        help='a function: NAME, "NAME:param=value,..." or a JSON object; repeat for more',
    )
    add_tag_argument(parser, "monitoring label: model=..., dataset=..., split=...")
    add_output_arguments(parser, 'print one JSON object {"results": ..., "diagnostics": [...]}')
    add_connection_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lossd eval`` with parsed arguments."""
    try:
        settings = connection_settings(args)
    except ValueError as exc:
        return fail("eval", str(exc), EXIT_INVALID)
    return eval_command(settings, args.inputs, args.specs, dict(args.tags), as_json=args.as_json, timeout=args.timeout, arrays=args.arrays)


# The prefixes numpy.load takes for a zip archive (a local file header, or an empty archive's end record).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def load_npz(path: Path, arrays: Sequence[str] | None = None) -> dict[str, Any]:
    """The named arrays of an .npz file (pickled objects refused); only ``arrays`` when given, each of which it must hold."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise ValueError(f"expected an .npz archive of named arrays (numpy.savez), got a single .npy array in {path}")
    if not magic.startswith(_ZIP_MAGIC):  # numpy would call any other file pickled data
        raise ValueError(f"expected an .npz archive of named arrays (numpy.savez writes one), got a file that is not a zip archive: {path}")
    with np.load(path, allow_pickle=False) as data:  # a zip: numpy opens it as an NpzFile
        missing = [name for name in arrays or () if name not in data.files]
        if missing:
            raise ValueError(f"--array {missing[0]}: {path} has no array named {missing[0]!r}; it has: {', '.join(data.files)}")
        return {name: data[name] for name in (arrays or data.files)}


def eval_command(
    settings: ClientSettings,
    inputs: Path,
    specs: Sequence[str],
    tags: dict[str, str],
    *,
    as_json: bool = False,
    timeout: float = 60.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
    arrays: Sequence[str] | None = None,
) -> int:
    """Evaluate ``specs`` on the arrays of ``inputs`` (only ``arrays``, when given) on the server of ``settings``; print the results."""
    try:
        tensors = load_npz(inputs, arrays)
        functions = function_specs(list(specs))
    except (OSError, ValueError) as exc:  # no such file, not an npz, object arrays, a bad spec
        return fail("eval", str(exc), EXIT_INVALID, err)
    try:
        with connect(settings, timeout) as client:
            result = client.evaluate(tensors, functions, tags=tags or None)
    except (SpecError, TensorError) as exc:
        return fail("eval", str(exc), EXIT_INVALID, err)
    except LossdError as exc:
        return fail_call("eval", exc, err)
    except ValueError as exc:  # unreadable certificates or token file
        return fail("eval", str(exc), EXIT_INVALID, err)
    if as_json:
        print(json.dumps(result.to_json(), allow_nan=False), file=out or sys.stdout)
    else:
        print_results(result, out or sys.stdout)
    return EXIT_OK
