"""The registry holds exactly the functions of CATALOGUE.md, from exactly the modules the catalogue lists.

Both directions are read from the documents themselves: every name and alias
of CATALOGUE.md's function tables is registered, and every registered name
and alias is documented there.  A module of lossd.kernels that declares a
function but is missing from lossd.kernels.catalogue fails here, so no
function can exist unserved and unnoticed.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest

import lossd.kernels
from lossd.kernels import FunctionDef, all_functions, evaluate, get_function
from lossd.kernels.catalogue import FAMILY_MODULES
from lossd.kernels.declarations import FAMILIES, Example
from lossd.kernels.registry import REGISTRY, Registry

REPO = Path(__file__).resolve().parents[3]
# The documented catalogue: in the repository's docs, or in the spec folder shared beside the repository.
CATALOGUE_PLACES = (REPO / "docs" / "CATALOGUE.md",)  # the repository's copy of the catalogue spec


def documented() -> tuple[set[str], dict[str, str]]:
    """(names, alias -> name) of CATALOGUE.md's functions, up to its Diagnostics section.

    Functions are the first cells of table rows, and the names of a paragraph
    opening with "Metrics:" (the regression metrics are listed so)."""
    found = [p for p in CATALOGUE_PLACES if p.exists()]
    if not found:
        pytest.fail(f"CATALOGUE.md is in none of {[str(p.relative_to(REPO)) for p in CATALOGUE_PLACES]}")
    text = found[0].read_text()
    tables = text[text.index("## Regression") : text.index("## Diagnostics")]
    names: set[str] = set()
    aliases: dict[str, str] = {}
    for paragraph in re.findall(r"^Metrics:.*?(?=\n\n)", tables, re.S | re.M):
        names |= set(re.findall(r"`(\w+)`", paragraph.split("Oracles:")[0]))
    for line in tables.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        for alias, name in re.findall(r"`(\w+)` \(alias `(\w+)`\)", cell):
            aliases[name] = alias
        cell = re.sub(r"\(alias `\w+`\)", "", cell)
        names |= set(re.findall(r"`(\w+)`", cell))
    return names, aliases


def test_registry_matches_the_catalogue_both_ways() -> None:
    names, aliases = documented()
    registered = {f.name for f in all_functions()}
    assert sorted(names - registered) == [], "documented in CATALOGUE.md but not registered"
    assert sorted(registered - names) == [], "registered but not documented in CATALOGUE.md"
    assert dict(REGISTRY.aliases) == aliases
    for alias, name in aliases.items():
        assert get_function(alias).name == name


def all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(lossd.kernels.__path__, "lossd.kernels."))


def declared_functions(module_name: str) -> list[FunctionDef]:
    module = importlib.import_module(module_name)
    return [v for v in vars(module).values() if isinstance(v, FunctionDef)]


@pytest.mark.parametrize("module_name", [m for m in all_modules() if not m.startswith("lossd.kernels.triton")])
def test_every_module_is_in_the_catalogue_or_declares_nothing(module_name: str) -> None:
    listed = {m.__name__ for m in FAMILY_MODULES}
    declared = declared_functions(module_name)
    if module_name in listed:
        module = importlib.import_module(module_name)
        assert sorted(f.name for f in module.FUNCTIONS) == sorted(f.name for f in declared), "FUNCTIONS must list every declaration"
    else:
        assert declared == [], f"{module_name} declares {[f.name for f in declared]} but lossd.kernels.catalogue does not list it"


def test_the_catalogue_lists_each_function_once() -> None:
    listed = [f.name for m in FAMILY_MODULES for f in m.FUNCTIONS]
    assert len(listed) == len(set(listed)) == len(REGISTRY)


def test_listing_is_sorted_by_family_then_name() -> None:
    keys = [(FAMILIES.index(f.family), f.name) for f in all_functions()]
    assert keys == sorted(keys)


def test_unknown_names_are_invalid_argument() -> None:
    with pytest.raises(lossd.kernels.InvalidInput, match="unknown function 'no_such_loss'"):
        get_function("no_such_loss")


def test_registry_refuses_a_name_declared_twice() -> None:
    mse = get_function("mse")
    with pytest.raises(ValueError, match="'mse' of 'mse' is already declared by 'mse'"):
        Registry([mse, mse])
    with pytest.raises(ValueError, match="'l1'"):
        Registry([get_function("mae"), FunctionDef(**{**vars(get_function("huber")), "aliases": ("l1",)})])


def test_registry_is_immutable() -> None:
    with pytest.raises(TypeError):
        REGISTRY.aliases["l2"] = "mse"  # type: ignore[index]


def test_embedding_functions_are_not_splittable() -> None:
    for f in all_functions():
        if f.family == "embedding":
            assert not f.splittable, f.name


@pytest.mark.parametrize("fdef", all_functions(), ids=lambda f: f.name)
def test_example_is_valid_and_clean(fdef: FunctionDef) -> None:
    """Every declaration's example evaluates without diagnostics, and names only declared roles."""
    assert isinstance(fdef.example, Example)
    tensors = fdef.example.make(np.random.default_rng(0), 12)
    roles = {r.name for r in fdef.roles}
    assert set(tensors) <= roles, f"example tensors {sorted(set(tensors) - roles)} are not roles"
    assert fdef.example.shared <= set(tensors)
    out = evaluate(tensors, [fdef.name])
    assert out.diagnostics == []
    assert np.isfinite(out[fdef.name].value) or out[fdef.name].tensors, fdef.name
