"""A validated function spec: the declaration, resolved parameters, role mapping and alias.

Its own module so that the evaluation (:mod:`lossd.kernels.evaluate`), the
non-finite policy and the server's subscribers can all name it without
importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from lossd.kernels.declarations import FunctionDef
from lossd.kernels.state import canonical_params

__all__ = ["Prepared"]


@dataclass(frozen=True)
class Prepared:
    """A validated spec: the function, its resolved parameters and its alias."""

    index: int
    fdef: FunctionDef
    params: Mapping[str, Any]
    inputs: Mapping[str, str]
    alias: str

    @cached_property
    def state_params(self) -> str:
        # Computed once: every update and merge of a stream compares it.
        return canonical_params(self.params)
