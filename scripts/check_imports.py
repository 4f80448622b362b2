"""Fail on import cycles inside each lossd package, and on modules or classes that are too long.

The import graph of each package (lossd.kernels; lossd.client with lossd.v1;
lossd.server) is read from the source with ``ast``, so it holds every import:
module level, inside functions and under ``if TYPE_CHECKING:``.  Any cycle
among the modules of one package fails the check (exit 1) and is printed.
``from pkg import sub`` is an edge to the submodule ``pkg.sub``; the
``__init__`` that Python runs first on the way to any submodule is not
counted (it is not what the importer depends on), but ``from pkg import
name`` of a name defined in ``pkg/__init__.py`` is an edge to it.

The size check fails on a module over 450 lines or a class over 150 lines.
``--max-lines-only PACKAGE`` (repeatable) limits the size failures to those
packages and reports the others as warnings; without it every package counts.

    python scripts/check_imports.py                          # cycles and sizes, all packages
    python scripts/check_imports.py --max-lines-only kernels # sizes fail for lossd.kernels only
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 150


@dataclass(frozen=True)
class Package:
    """One distribution's packages: the short name used on the command line and its import roots."""

    name: str
    roots: Mapping[str, Path]  # dotted package name -> its source folder


PACKAGES = (
    Package("kernels", {"lossd.kernels": ROOT / "kernels/lossd/kernels"}),
    Package("client", {"lossd.client": ROOT / "client/lossd/client", "lossd.v1": ROOT / "client/lossd/v1"}),
    Package("server", {"lossd.server": ROOT / "server/lossd/server"}),
)


def modules(package: Package) -> dict[str, Path]:
    """Every module of the package: dotted name -> source file (``__init__.py`` for packages)."""
    found: dict[str, Path] = {}
    for dotted, folder in package.roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([dotted, *parts])] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_names(module: str, path: Path) -> Iterator[str]:
    """Dotted names this module imports, anywhere in its body (functions and TYPE_CHECKING blocks included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if _is_package(path) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                yield f"{source}.{alias.name}"  # the submodule when it is one, else (resolved below) the module itself


def graph(package: Package) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports."""
    known = modules(package)
    edges: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for name in imported_names(module, path):
            target = _resolve(name, known)
            if target is None or target == module:
                continue
            edges[module].add(target)
    return edges


def _resolve(name: str, known: Mapping[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def find_cycle(edges: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as [m0, m1, ..., m0], or None when the graph is acyclic."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(edges, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(edges[node]):
            if colour[nxt] == grey:
                return stack[stack.index(nxt) :] + [nxt]
            if colour[nxt] == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = black
        return None

    for start in sorted(edges):
        if colour[start] == white:
            found = visit(start)
            if found:
                return found
    return None


def oversized(package: Package) -> Iterator[str]:
    """'path: what' for each module over MAX_MODULE_LINES and each class over MAX_CLASS_LINES."""
    for path in modules(package).values():
        text = path.read_text()
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            yield f"{rel}: {n} lines (at most {MAX_MODULE_LINES})"
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    yield f"{rel}:{node.lineno}: class {node.name} has {length} lines (at most {MAX_CLASS_LINES})"


def main(argv: Sequence[str] | None = None) -> int:
    """Check every package; return the exit status (0: clean, 1: a cycle or a size failure)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--max-lines-only",
        action="append",
        choices=[p.name for p in PACKAGES],
        metavar="PACKAGE",
        help="fail the size check only for these packages (kernels, client, server); others are reported as warnings",
    )
    args = parser.parse_args(argv)
    enforced = set(args.max_lines_only or [p.name for p in PACKAGES])
    failed = False
    for package in PACKAGES:
        cycle = find_cycle(graph(package))
        if cycle:
            failed = True
            print(f"import cycle in {package.name}: {' -> '.join(cycle)}")
        for problem in oversized(package):
            if package.name in enforced:
                failed = True
                print(f"too long: {problem}")
            else:
                print(f"warning (not enforced for {package.name}): too long: {problem}")
    if not failed:
        print(
            f"no import cycle in {', '.join(p.name for p in PACKAGES)}; sizes within limits where enforced ({', '.join(sorted(enforced))})"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
