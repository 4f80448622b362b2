"""``lossd finalize``: merge state files written by ranks or shards (``save_states``) and print the values."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

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
from lossd.client.errors import LossdError
from lossd.client.settings import ClientSettings
from lossd.client.state_files import finalize_files

__all__ = ["register", "run", "finalize_command"]


def register(commands: Commands) -> None:
    """Add the ``finalize`` parser."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "finalize", help="merge state files written by ranks or shards (save_states) and print the values"
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="STATE_FILE", help="files written by lossd.client.distributed.save_states")
    add_tag_argument(parser, "monitoring label (default: the files' tags)")
    add_output_arguments(parser, 'print one JSON object {"results": ..., "diagnostics": [...]}')
    add_connection_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lossd finalize`` with parsed arguments."""
    try:
        settings = connection_settings(args)
    except ValueError as exc:
        return fail("finalize", str(exc), EXIT_INVALID)
    return finalize_command(settings, args.files, dict(args.tags), as_json=args.as_json, timeout=args.timeout)


def finalize_command(
    settings: ClientSettings,
    files: Sequence[Path],
    tags: dict[str, str],
    *,
    as_json: bool = False,
    timeout: float = 60.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Merge the states of ``files`` (one per rank or shard) with one Finalize call and print the values."""
    try:
        with connect(settings, timeout) as client:
            result = finalize_files(client, files, tags=tags or None)
    except LossdError as exc:
        return fail_call("finalize", exc, err)
    except (OSError, ValueError) as exc:  # no such file, not a state file, files of different functions or tags, no states
        return fail("finalize", str(exc), EXIT_INVALID, err)
    if as_json:
        print(json.dumps(result.to_json(), allow_nan=False), file=out or sys.stdout)
    else:
        print_results(result, out or sys.stdout)
    return EXIT_OK
