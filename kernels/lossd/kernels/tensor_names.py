"""Every tensor of a request must be read by one of its functions.

A tensor no function reads would change nothing, silently: a misspelt
optional role (``weight`` for ``weights``, ``mask`` where the function has
none) gives the unweighted answer as if it were the one asked for. So such a
tensor is refused, naming it, with the closest name a function does read
and the names they read. Triton and KServe's V2 protocol refuse an unknown
input the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from lossd.kernels.errors import FieldViolation, InvalidInput
from lossd.kernels.prepared import Prepared

__all__ = ["check_all_read", "names_read"]

_LISTED = 12  # names read that a message lists: a request of many functions reads many


def names_read(prepared: Iterable[Prepared]) -> dict[str, list[str]]:
    """Tensor name -> the ``alias.role`` entries that read it, over every prepared function (roles resolved through inputs)."""
    read: dict[str, list[str]] = {}
    for p in prepared:
        for role in p.fdef.roles:
            read.setdefault(p.inputs.get(role.name, role.name), []).append(f"{p.alias}.{role.name}")
    return read


def check_all_read(prepared: Iterable[Prepared], tensors: Mapping[str, Any]) -> None:
    """Refuse the tensors of ``tensors`` that no function of ``prepared`` reads (one violation each, on ``tensors.NAME``)."""
    prepared = tuple(prepared)
    read = names_read(prepared)
    unread = [name for name in tensors if name not in read]
    if not unread:
        return
    known = sorted(read)
    listed = ", ".join(known[:_LISTED]) + (f" and {len(known) - _LISTED} more" if len(known) > _LISTED else "")
    violations = []
    for name in unread:
        close = difflib.get_close_matches(name, [n for n in known if n not in tensors], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        violations.append(
            FieldViolation(
                f"tensors.{name}",
                f"no requested function reads a tensor named {name!r}{hint}, so it would change nothing; "
                f"they read: {listed}. Leave it out, or give it to a role with a function's inputs "
                "({ROLE: " + repr(name) + "})",
            )
        )
    raise InvalidInput(violations)
