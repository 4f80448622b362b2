"""Prints the third-party dependencies of the given pyproject.toml files, one a line.

The image installs these in a layer of their own, from the pyproject files alone, before
any source is copied: a code change then rebuilds only the small lossd layer. The lossd
distributions themselves (which pin each other) are left out; they are installed from
source afterwards with --no-deps.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def third_party(pyprojects: list[Path]) -> list[str]:
    """The dependencies of every file, lossd-* excluded, in first-seen order."""
    seen: dict[str, None] = {}
    for path in pyprojects:
        for requirement in tomllib.loads(path.read_text())["project"]["dependencies"]:
            name = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower()
            if not name.startswith("lossd-"):
                seen.setdefault(requirement, None)
    return list(seen)


if __name__ == "__main__":
    print("\n".join(third_party([Path(arg) for arg in sys.argv[1:]])))
