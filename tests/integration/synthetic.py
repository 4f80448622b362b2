"""Synthetic batches for every registered function, many functions per request.

A *group* makes the tensors of one batch (``make(rng, n)``, names prefixed
with the group, e.g. ``fncrossentropy_logits``) and may add tensors shared by
every batch (``shared(rng)``: the candidate keys of a retrieval metric). A
*case* is one function spec reading one group's tensors through
``FunctionSpec.inputs``.

Every registered function has a case on a group made from its declared
:class:`~lossd.kernels.declarations.Example` (cast to float64, with random
``weights`` where the function takes them and some labels set to
``ignore_index`` where it has one), so a new function is covered without
touching this file.  ``VARIANTS`` adds cases with other parameters or input
layouts (soft targets, binary scores, several quantiles).

Row groups (``rows=True``) put the sample on dim 0 of every non-shared
tensor, so the batches of all ranks concatenate into one whole-data batch:
that is what splittable functions are compared against. Non-splittable
functions (their value depends on the whole batch) are compared against the
same batches accumulated in one process instead.

Used by the distributed worker (a subprocess), so it imports nothing from the
test tree. Everything is float64: the comparisons are about merging, not dtypes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lossd.kernels import FunctionDef, all_functions, get_function
from lossd.kernels.params import resolve_params

__all__ = [
    "Group",
    "Case",
    "GROUPS",
    "CASES",
    "VARIANTS",
    "SKIPPED",
    "BATCH_DEPENDENT",
    "specs",
    "batch",
    "shared_tensors",
    "concat",
    "shard_batches",
]

K = 5  # classes of the variant groups

Arrays = dict[str, np.ndarray]


def _labels(rng: np.random.Generator, n: int, k: int, ignored: float = 0.1) -> np.ndarray:
    y = rng.integers(0, k, n)
    y[rng.random(n) < ignored] = -100
    return y


def _log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


@dataclass(frozen=True)
class Group:
    """Tensors for one kind of input; keys are role names (before prefixing)."""

    name: str
    make: Callable[[np.random.Generator, int], Arrays]
    shared: Callable[[np.random.Generator], Arrays] = field(default=lambda rng: {})
    rows: bool = True  # dim 0 of every non-shared tensor is the sample


def _group_name(fdef: FunctionDef) -> str:
    # Tensor names are "<group>_<role>": a group name holds no underscore.
    return "fn" + fdef.name.replace("_", "")


def _as_float64(arrays: Arrays) -> Arrays:
    return {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in arrays.items()}


def _example_group(fdef: FunctionDef) -> Group:
    """A group from the function's declared example, with weights and ignored labels where the function takes them."""
    example = fdef.example
    roles = {r.name: r for r in fdef.roles}
    ignore = next((p.default for p in fdef.params if p.name == "ignore_index"), None)

    def make(rng: np.random.Generator, n: int) -> Arrays:
        arrays = {k: v for k, v in _as_float64(example.make(rng, n)).items() if k not in example.shared}
        if "weights" in roles and "weights" not in arrays and arrays:
            leading = next(iter(arrays.values())).shape[0]
            arrays["weights"] = rng.random(leading) + 0.5
        labels = arrays.get("labels")
        if ignore is not None and labels is not None and roles["labels"].dtype == "index":
            labels = labels.copy()
            labels[rng.random(labels.shape) < 0.1] = ignore
            arrays["labels"] = labels
        return arrays

    def shared(rng: np.random.Generator) -> Arrays:
        return {k: v for k, v in _as_float64(example.make(rng, 2)).items() if k in example.shared}

    return Group(_group_name(fdef), make, shared, rows=example.rows)


# Inputs of the variant cases that the declared examples do not cover.
_VARIANT_GROUPS = (
    Group(
        "quant",
        lambda r, n: {"predictions": r.standard_normal((n, 2, 3)), "targets": r.standard_normal((n, 2)), "weights": r.random(n) + 0.5},
    ),
    Group(
        "seg",
        lambda r, n: {
            "logits": r.standard_normal((n, 2, 5)) * 2,
            "targets": (r.random((n, 2, 5)) < 0.4).astype(np.float64),
            "weights": r.random(n) + 0.5,
        },
    ),
    Group(
        "bin",
        lambda r, n: {
            "logits": r.standard_normal(n) * 2,
            "targets": (r.random(n) < 0.4).astype(np.float64),
            "weights": r.random(n) + 0.5,
        },
    ),
    Group("cls", lambda r, n: {"logits": r.standard_normal((n, K)) * 2, "labels": _labels(r, n, K), "weights": r.random(n) + 0.5}),
    Group("soft", lambda r, n: {"logits": r.standard_normal((n, K)) * 2, "target_probs": np.exp(_log_softmax(r.standard_normal((n, K))))}),
    Group(
        "ppo",
        lambda r, n: {
            "logp_new": -r.random((n, 3)) * 3,
            "logp_old": -r.random((n, 3)) * 3,
            "logp_ref": -r.random((n, 3)) * 3,
            "advantages": r.standard_normal((n, 3)),
            "mask": (r.random((n, 3)) < 0.8).astype(np.float64),
        },
    ),
)

GROUPS: dict[str, Group] = {g.name: g for g in (*(_example_group(f) for f in all_functions()), *_VARIANT_GROUPS)}


@dataclass(frozen=True)
class Case:
    """One function spec over one group: ``roles`` maps the function's roles to the group's tensors."""

    alias: str
    name: str
    group: str
    params: dict[str, Any] = field(default_factory=dict)
    roles: dict[str, str] | None = None  # role -> group tensor; None: every group tensor the function has a role for

    @property
    def splittable(self) -> bool:
        """Whether the function, with these parameters, may split a batch (then ranks' states merge exactly)."""
        fdef = get_function(self.name)
        return GROUPS[self.group].rows and fdef.is_splittable(resolve_params(fdef.params, self.params, self.alias))

    @property
    def whole_data(self) -> bool:
        """Whether the merged value equals the value of the concatenated batches (else: of the same batches, merged)."""
        return self.splittable and self.name not in BATCH_DEPENDENT

    def spec(self, role_names: Sequence[str]) -> dict[str, Any]:
        group = GROUPS[self.group]
        available = set(group.make(np.random.default_rng(0), 2)) | set(group.shared(np.random.default_rng(0)))
        roles = self.roles if self.roles is not None else {r: r for r in role_names if r in available}
        return {
            "name": self.name,
            "alias": self.alias,
            "params": dict(self.params),
            "inputs": {role: f"{self.group}_{t}" for role, t in roles.items()},
        }


def _example_cases() -> list[Case]:
    """One case per registered function, on the group made from its example."""
    return [Case(f.name, f.name, _group_name(f)) for f in all_functions()]


def _fn(name: str) -> str:
    return _group_name(get_function(name))


# Other parameters and input layouts of functions that the example cases already cover.
VARIANTS: list[Case] = [
    Case("quantile_three", "quantile", "quant", {"quantiles": [0.1, 0.5, 0.9]}),
    Case("bce_segmentation", "bce_with_logits", "seg"),
    Case("dice_segmentation", "dice", "seg"),
    Case("hinge_segmentation", "hinge", "seg"),
    Case("cross_entropy_smoothed", "cross_entropy", "cls", {"label_smoothing": 0.1, "weight": [1.0, 2.0, 0.5, 1.0, 3.0]}),
    Case("cross_entropy_soft", "cross_entropy", "soft"),
    Case("top_k_accuracy_2", "top_k_accuracy", "cls", {"k": 2}),
    Case("auroc_binned", "auroc", "cls", {"bins": 64}),
    Case("average_precision_binned", "average_precision", "cls", {"bins": 64}),
    Case("f1_micro", "f1", "cls", {"average": "micro"}),
    Case("ece_l2", "ece", "cls", {"n_bins": 10, "norm": "l2"}),
    Case("ece_classwise", "ece", "cls", {"scope": "classwise"}),
    Case("temperature_cls", "temperature", "cls"),
    Case("accuracy_binary", "accuracy", "bin"),
    Case("auroc_binary", "auroc", "bin", roles={"logits": "logits", "targets": "targets"}),
    Case("average_precision_binary", "average_precision", "bin", roles={"logits": "logits", "targets": "targets"}),
    Case("brier_binary", "brier", "bin"),
    Case("log_loss_binary", "log_loss", "bin"),
    Case("ece_binary", "ece", "bin", roles={"logits": "logits", "targets": "targets"}),
    Case("adaptive_ece_binary", "adaptive_ece", "bin", roles={"logits": "logits", "targets": "targets"}),
    Case("bce_binary", "bce_with_logits", "bin", {"pos_weight": 2.0}),
    Case("distillation_kl_t2", "distillation_kl", _fn("distillation_kl"), {"temperature": 2.0}),
    Case("lm_cross_entropy_sequence", "lm_cross_entropy", _fn("lm_cross_entropy"), {"normalization": "sequence"}),
    Case("dpo_smoothed", "dpo", _fn("dpo"), {"label_smoothing": 0.1}),
    Case("dpo_ipo", "dpo", _fn("dpo"), {"loss_type": "ipo"}),
    Case("pairwise_logistic_margin", "pairwise_logistic", _fn("pairwise_logistic"), {"margin": 0.2}),
    Case("ppo_clip_kl", "ppo_clip", "ppo", {"kl_coef": 0.1}),
    Case("ppo_clip_normalized", "ppo_clip", "ppo", {"normalize_advantages": True}),
    Case("recall_at_k_3", "recall_at_k", _fn("recall_at_k"), {"k": 3}),
    Case("recall_at_k_cosine", "recall_at_k", _fn("recall_at_k"), {"k": 2, "similarity": "cosine"}),
]


def _cases() -> list[Case]:
    return _example_cases() + VARIANTS


CASES: list[Case] = _cases()

# Registered functions no case covers, with the reason. Empty: every function has a case.
SKIPPED: dict[str, str] = {}

# Splittable functions whose merged value is, by design, not the whole-data value
# (their values are compared against the same batches merged in one process).
BATCH_DEPENDENT: dict[str, str] = {
    "adaptive_ece": "equal-mass bins need every score at once; over several batches the value is the documented "
    "histogram estimate (its histogram_value output is exact and compared against the whole data)",
}


def specs(cases: Sequence[Case]) -> list[dict[str, Any]]:
    """The function specs of the cases, each reading its group's tensors."""
    return [c.spec([r.name for r in get_function(c.name).roles]) for c in cases]


def batch(groups: Sequence[str], seed: int, rank: int, index: int, n: int) -> Arrays:
    """Batch ``index`` of ``rank``: ``n`` rows of every group, names prefixed; deterministic."""
    out: Arrays = {}
    for g in groups:
        rng = np.random.default_rng([seed, rank, index, sorted(GROUPS).index(g)])
        out.update({f"{g}_{k}": v for k, v in GROUPS[g].make(rng, n).items()})
    return out


def shared_tensors(groups: Sequence[str], seed: int) -> Arrays:
    out: Arrays = {}
    for g in groups:
        out.update({f"{g}_{k}": v for k, v in GROUPS[g].shared(np.random.default_rng([seed, 1 << 20, sorted(GROUPS).index(g)])).items()})
    return out


def shard_batches(groups: Sequence[str], seed: int, rank: int, batches: int, min_rows: int = 3, max_rows: int = 12) -> list[Arrays]:
    """Make the batches of one rank's shard (random sizes), each with the shared tensors."""
    sizes = np.random.default_rng([seed, rank]).integers(min_rows, max_rows + 1, batches)
    shared = shared_tensors(groups, seed)
    return [{**batch(groups, seed, rank, i, int(n)), **shared} for i, n in enumerate(sizes)]


def concat(batches: Sequence[Arrays], groups: Sequence[str], seed: int) -> Arrays:
    """Make the whole-data batch: row tensors concatenated on dim 0, shared tensors once."""
    shared = shared_tensors(groups, seed)
    keys = [k for k in batches[0] if k not in shared]
    return {**{k: np.concatenate([b[k] for b in batches], axis=0) for k in keys}, **shared}
