"""scripts/check_imports.py: no import cycle in any package, every package within the size limits, and it catches what it must."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_imports.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_the_repository_passes_as_make_check_runs_it() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no import cycle in kernels, client, server" in done.stdout


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.mark.parametrize(
    "b_source",
    [
        "from pkg.a import thing\n",  # module level
        "def f():\n    from pkg import a\n",  # inside a function
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import thing\n",  # type checking only
        "from . import a\n",  # relative
    ],
    ids=["module-level", "in-function", "type-checking", "relative"],
)
def test_every_kind_of_import_closes_a_cycle(tmp_path: Path, b_source: str) -> None:
    check = load_script()
    write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import other\nthing = 1\n", "pkg/b.py": b_source})
    package = check.Package("pkg", {"pkg": tmp_path / "pkg"})
    assert check.find_cycle(check.graph(package)) == ["pkg.a", "pkg.b", "pkg.a"]


def test_an_acyclic_package_passes(tmp_path: Path) -> None:
    check = load_script()
    write(
        tmp_path, {"pkg/__init__.py": "from pkg.a import thing\n", "pkg/a.py": "from pkg import b\nthing = 1\n", "pkg/b.py": "import os\n"}
    )
    package = check.Package("pkg", {"pkg": tmp_path / "pkg"})
    assert check.graph(package) == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert check.find_cycle(check.graph(package)) is None


def test_sizes_are_reported(tmp_path: Path) -> None:
    check = load_script()
    body = "\n".join(f"    x{i} = {i}" for i in range(check.MAX_CLASS_LINES))
    write(tmp_path, {"pkg/__init__.py": "", "pkg/big.py": "class Big:\n" + body + "\n" + "\n" * check.MAX_MODULE_LINES})
    problems = list(check.oversized(check.Package("pkg", {"pkg": tmp_path / "pkg"})))
    assert len(problems) == 2
    assert "class Big has 151 lines" in problems[1] and "lines (at most 450)" in problems[0]
