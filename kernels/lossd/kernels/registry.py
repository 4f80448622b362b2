"""The registry: every function of the catalogue, looked up by name or alias.

Built once, from the ``FUNCTIONS`` of the family modules that
:mod:`lossd.kernels.catalogue` lists, and immutable afterwards: nothing can
add a function at run time, and a name or alias declared twice fails at
import, naming both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from lossd.kernels.catalogue import FAMILY_MODULES
from lossd.kernels.declarations import FAMILIES, FunctionDef
from lossd.kernels.errors import InvalidInput

__all__ = ["Registry", "REGISTRY", "get_function", "all_functions"]


class Registry:
    """An immutable lookup of functions by name and alias, with a sorted listing."""

    def __init__(self, functions: Iterable[FunctionDef]) -> None:
        by_name: dict[str, FunctionDef] = {}
        aliases: dict[str, str] = {}
        for fdef in functions:
            for name in (fdef.name, *fdef.aliases):
                if name in by_name or name in aliases:
                    owner = by_name.get(name) or by_name[aliases[name]]
                    raise ValueError(f"function name {name!r} of {fdef.name!r} is already declared by {owner.name!r}")
            by_name[fdef.name] = fdef
            aliases.update(dict.fromkeys(fdef.aliases, fdef.name))
        self._by_name: Mapping[str, FunctionDef] = MappingProxyType(by_name)
        self.aliases: Mapping[str, str] = MappingProxyType(aliases)  # alias -> canonical name
        self._sorted = tuple(sorted(by_name.values(), key=lambda f: (FAMILIES.index(f.family), f.name)))

    def get(self, name: str, path: str = "functions") -> FunctionDef:
        """Look a function up by name or alias; unknown names are INVALID_ARGUMENT at ``path``.name."""
        try:
            return self._by_name[self.aliases.get(name, name)]
        except KeyError:
            raise InvalidInput.single(
                f"{path}.name", f"unknown function {name!r}; `lossd functions` lists the {len(self._by_name)} available"
            ) from None

    def functions(self) -> tuple[FunctionDef, ...]:
        """Every function, sorted by family then name."""
        return self._sorted

    def __contains__(self, name: object) -> bool:
        return name in self._by_name or name in self.aliases

    def __len__(self) -> int:
        return len(self._by_name)


REGISTRY = Registry(fdef for module in FAMILY_MODULES for fdef in module.FUNCTIONS)


def get_function(name: str, path: str = "functions") -> FunctionDef:
    """Look a function up by name or alias; unknown names are INVALID_ARGUMENT."""
    return REGISTRY.get(name, path)


def all_functions() -> list[FunctionDef]:
    """Every registered function, sorted by family then name."""
    return list(REGISTRY.functions())
