"""The function registry: one declaration per loss, metric or calibration statistic.

A :class:`FunctionDef` says everything the service, the CLI and ListFunctions
need: the roles (input tensors) it reads, its parameters, its outputs, how its
state merges, whether a batch may be split, and the reference its values are
tested against.  ``update`` turns a batch into state fields; ``finalize`` turns
merged fields into values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lossd.kernels.errors import InvalidInput
from lossd.kernels.params import Param
from lossd.kernels.state import MergeOp

if TYPE_CHECKING:
    import torch

    from lossd.kernels.plan import View

__all__ = ["Role", "Output", "Result", "FunctionDef", "register", "get_function", "all_functions", "FAMILIES"]

FAMILIES = (
    "regression",
    "binary",
    "classification",
    "sequence",
    "embedding",
    "preference",
    "metric",
    "calibration",
)


@dataclass(frozen=True)
class Role:
    """One input tensor a function reads.

    ``dtype`` is "float" (any floating dtype), "index" (integer class indices;
    floats holding integers are accepted and cast), "binary" (0/1 values,
    float or int or bool) or "any".
    """

    name: str
    shape: str
    dtype: str = "float"
    doc: str = ""
    optional: bool = False


@dataclass(frozen=True)
class Output:
    """A named output. Scalars are float64 values; tensors come back as arrays."""

    name: str
    doc: str
    tensor: bool = False


@dataclass
class Result:
    """The finalized values of one function."""

    values: dict[str, float] = field(default_factory=dict)  # "value" is the primary output
    tensors: dict[str, Any] = field(default_factory=dict)  # name -> numpy array
    denominator: float | None = None  # the denominator of a mean, as used
    denominator_kind: str = ""  # samples | elements | valid_tokens | sequences | weights | batches | pairs
    # Set when the primary value is an additive mean: value = numerator / denominator
    # (or value = numerator under reduction="sum"), where numerator and denominator
    # are sums that merge by addition over batches, shards and replicas.  Monitoring
    # exports them as counters; None for values that are not such a mean (ECE,
    # AUROC, F1, perplexity = exp of a mean, RMSE, R², a fitted temperature).
    numerator: float | None = None


UpdateFn = Callable[["View", Mapping[str, Any]], "dict[str, torch.Tensor]"]
FinalizeFn = Callable[["Mapping[str, torch.Tensor]", Mapping[str, Any]], Result]
PerElementFn = Callable[["View", Mapping[str, Any]], "torch.Tensor"]


@dataclass(frozen=True)
class FunctionDef:
    """The declaration of one function. See the module docstring."""

    name: str
    family: str
    summary: str
    roles: tuple[Role, ...]
    params: tuple[Param, ...]
    outputs: tuple[Output, ...]
    fields: Mapping[str, MergeOp]
    update: UpdateFn
    finalize: FinalizeFn
    reference: str
    splittable: bool = True
    aliases: tuple[str, ...] = ()
    per_element: PerElementFn | None = None  # values for reduction="none"
    state_version: int = 1
    finalize_diagnostics: Callable[[Mapping[str, Any], Mapping[str, Any]], list[tuple[str, str]]] | None = None
    # For a function splittable only with some parameters (ppo_clip normalizing
    # advantages with batch statistics): False for the parameters that make a
    # batch's value depend on the whole batch.  ``splittable`` stays the default.
    splittable_if: Callable[[Mapping[str, Any]], bool] | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family must be one of {FAMILIES}, got {self.family!r}")
        names = [r.name for r in self.roles]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate role names {names}")

    def role(self, name: str) -> Role:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(name)

    def is_splittable(self, params: Mapping[str, Any]) -> bool:
        """Whether a batch may be split into parts and merged, with these resolved parameters."""
        return self.splittable and (self.splittable_if is None or self.splittable_if(params))

    @property
    def has_reduction(self) -> bool:
        return any(p.name == "reduction" for p in self.params)


_REGISTRY: dict[str, FunctionDef] = {}
_ALIASES: dict[str, str] = {}


def register(fdef: FunctionDef) -> FunctionDef:
    """Add a function to the registry; names and aliases must be unique."""
    for name in (fdef.name, *fdef.aliases):
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"function name {name!r} is already registered")
    _REGISTRY[fdef.name] = fdef
    for alias in fdef.aliases:
        _ALIASES[alias] = fdef.name
    return fdef


def get_function(name: str, path: str = "functions") -> FunctionDef:
    """Look a function up by name or alias; unknown names are INVALID_ARGUMENT."""
    _load_catalogue()
    canonical = _ALIASES.get(name, name)
    try:
        return _REGISTRY[canonical]
    except KeyError:
        raise InvalidInput.single(
            f"{path}.name", f"unknown function {name!r}; `lossd functions` lists the {len(_REGISTRY)} available"
        ) from None


def all_functions() -> list[FunctionDef]:
    """Every registered function, sorted by family then name."""
    _load_catalogue()
    return sorted(_REGISTRY.values(), key=lambda f: (FAMILIES.index(f.family), f.name))


def _load_catalogue() -> None:
    # Importing the families registers their functions; done lazily so that
    # `import lossd.kernels.registry` stays cheap and cycle-free.
    import lossd.kernels.catalogue  # noqa: F401
