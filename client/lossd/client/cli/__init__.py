"""The ``lossd`` command.

    lossd eval --server HOST:PORT --inputs batch.npz --fn cross_entropy --fn "ece:n_bins=15" [--json]
    lossd finalize --server HOST:PORT STATE_FILE... [--tag KEY=VALUE] [--json]
    lossd functions [--server HOST:PORT] [--family F] [--json]
    lossd serve ...            (with lossd-server installed)
    lossd --version

The client commands (one module each) import neither torch nor the server.
Other packages add commands through the ``lossd.commands`` entry point group:
each entry point names a function ``register(commands)`` that adds its
parser to the ``add_subparsers()`` object and sets ``handler`` (a function
of the parsed arguments returning the exit code); lossd-server adds
``serve`` this way. Without lossd-server, ``lossd serve`` says in one line
what to install and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version

from lossd.client.cli import eval as eval_cmd
from lossd.client.cli import finalize, functions
from lossd.client.cli.common import EXIT_FAILURE, EXIT_INVALID, Commands
from lossd.client.cli.output import fail

__all__ = ["main", "build_parser", "ENTRY_POINT_GROUP", "versions"]

ENTRY_POINT_GROUP = "lossd.commands"
_BUILT_IN: tuple[Callable[[Commands], None], ...] = (eval_cmd.register, finalize.register, functions.register)
# Commands that come with another distribution, and which one to install for each.
_OPTIONAL = {"serve": "lossd-server"}
_DISTRIBUTIONS = ("lossd-client", "lossd-server", "lossd-kernels")


def versions() -> str:
    """``lossd-client 0.1.0, lossd-server 0.1.0, ...`` for the lossd distributions installed here."""
    found = []
    for name in _DISTRIBUTIONS:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def _missing_command(name: str, distribution: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return fail(name, f"needs {distribution}: install it (pip install {distribution}) to get `lossd {name}`", EXIT_INVALID)

    return handler


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command: the built-in client commands, then those of the ``lossd.commands`` entry points."""
    parser = argparse.ArgumentParser(prog="lossd", description="lossd: a loss-evaluation service.")
    parser.add_argument("--version", action="version", version=f"lossd: {versions()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for built_in in _BUILT_IN:
        built_in(commands)
    plugged = set()
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register = entry.load()
        except ImportError:  # metadata left behind by a removed or broken install: as if absent
            continue
        register(commands)
        plugged.add(entry.name)
    for name, distribution in _OPTIONAL.items():
        if name not in plugged:  # any arguments accepted, so that the one line of the handler is what the user sees
            missing = commands.add_parser(name, help=f"(install {distribution})", add_help=False)
            missing.set_defaults(handler=_missing_command(name, distribution), accepts_any_arguments=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lossd`` command; returns its exit code (2: invalid arguments, 1: any other failure)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code: int = args.handler(args)
        return code
    except BrokenPipeError:  # `lossd functions | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
