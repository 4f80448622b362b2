"""Synthetic batches for every registered function, many functions per request.

A *group* makes the tensors of one batch (``make(rng, n)``, names prefixed
with the group, e.g. ``cls_logits``) and may add tensors shared by every batch
(``shared(rng)``: the candidate keys of a retrieval metric). A *case* is one
function spec reading one group's tensors through ``FunctionSpec.inputs``.

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

__all__ = ["Group", "Case", "GROUPS", "CASES", "SKIPPED", "BATCH_DEPENDENT", "specs", "batch", "shared_tensors", "concat", "shard_batches"]

K = 5  # classes
D = 4  # embedding width
M = 11  # retrieval candidates
T = 6  # sequence length
V = 7  # vocabulary
E = 4  # experts

Arrays = dict[str, np.ndarray]


def _labels(rng: np.random.Generator, n: int, k: int, ignored: float = 0.1) -> np.ndarray:
    y = rng.integers(0, k, n)
    y[rng.random(n) < ignored] = -100
    return y


def _log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _grouped_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Labels of ``k`` classes with a positive pair (rows 0, 1) and a negative one (rows 0, 2) in every batch of 3+ rows."""
    y = rng.integers(0, k, n)
    y[1:2] = y[0]
    y[2:3] = (y[0] + 1) % k
    return y


def _logps(rng: np.random.Generator, n: int) -> np.ndarray:
    return -rng.random(n) * 20 - 1


@dataclass(frozen=True)
class Group:
    """Tensors for one kind of input; keys are role names (before prefixing)."""

    name: str
    make: Callable[[np.random.Generator, int], Arrays]
    shared: Callable[[np.random.Generator], Arrays] = field(default=lambda rng: {})
    rows: bool = True  # dim 0 of every non-shared tensor is the sample


def _ctc(rng: np.random.Generator, n: int) -> Arrays:
    steps, classes, s = 8, 5, 3
    target_lengths = rng.integers(1, s + 1, n)
    return {
        "log_probs": _log_softmax(rng.standard_normal((steps, n, classes))),
        "targets": rng.integers(1, classes, (n, s)),
        "input_lengths": rng.integers(s * 2 + 1, steps + 1, n),
        "target_lengths": target_lengths,
    }


GROUPS: dict[str, Group] = {
    g.name: g
    for g in (
        Group(
            "reg",
            lambda r, n: {
                "predictions": r.standard_normal((n, 3)),
                "targets": r.standard_normal((n, 3)),
                "variance": r.random((n, 3)) + 0.1,
                "weights": r.random(n) + 0.5,
            },
        ),
        Group(
            "count",
            lambda r, n: {
                "predictions": r.standard_normal((n, 3)) * 0.5,
                "targets": r.poisson(2.0, (n, 3)).astype(np.float64),
                "weights": r.random(n) + 0.5,
            },
        ),
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
        Group(
            "soft", lambda r, n: {"logits": r.standard_normal((n, K)) * 2, "target_probs": np.exp(_log_softmax(r.standard_normal((n, K))))}
        ),
        Group(
            "lp",
            lambda r, n: {
                "log_probs": _log_softmax(r.standard_normal((n, K)) * 2),
                "labels": _labels(r, n, K),
                "weights": r.random(n) + 0.5,
            },
        ),
        Group(
            "kl",
            lambda r, n: {"log_probs": _log_softmax(r.standard_normal((n, K))), "target": np.exp(_log_softmax(r.standard_normal((n, K))))},
        ),
        Group("distill", lambda r, n: {"logits": r.standard_normal((n, K)) * 2, "teacher_logits": r.standard_normal((n, K)) * 2}),
        Group("lm", lambda r, n: {"logits": r.standard_normal((n, T, V)) * 2, "labels": _labels(r, n * T, V, 0.2).reshape(n, T)}),
        Group(
            "dpo",
            lambda r, n: {
                "policy_chosen_logps": _logps(r, n),
                "policy_rejected_logps": _logps(r, n),
                "reference_chosen_logps": _logps(r, n),
                "reference_rejected_logps": _logps(r, n),
                "weights": r.random(n) + 0.5,
            },
        ),
        Group(
            "pair",
            lambda r, n: {"chosen_scores": r.standard_normal(n), "rejected_scores": r.standard_normal(n), "weights": r.random(n) + 0.5},
        ),
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
        Group("moe", lambda r, n: {"router_logits": r.standard_normal((n, E)), "mask": (r.random(n) < 0.9).astype(np.float64)}),
        Group(
            "rank",
            lambda r, n: {"query": r.standard_normal((n, D)), "relevant": r.integers(0, M, n)},
            shared=lambda r: {"keys": r.standard_normal((M, D))},
        ),
        # Non-splittable inputs: compared batch by batch, never concatenated.
        Group(
            "emb",
            lambda r, n: {"embeddings": r.standard_normal((n, D)), "labels": _grouped_labels(r, n, 3)},
            shared=lambda r: {"class_weights": r.standard_normal((D, 3))},
            rows=False,
        ),
        Group(
            "pairs",
            lambda r, n: {
                "x1": r.standard_normal((n, D)),
                "x2": r.standard_normal((n, D)),
                "similar": (r.random(n) < 0.5).astype(np.float64),
            },
            rows=False,
        ),
        Group("nce", lambda r, n: {"query": r.standard_normal((n, D)), "keys": r.standard_normal((n, D))}, rows=False),
        Group(
            "trip",
            lambda r, n: {
                "anchor": r.standard_normal((n, D)),
                "positive": r.standard_normal((n, D)),
                "negative": r.standard_normal((n, D)),
            },
            rows=False,
        ),
        Group("ctc", _ctc, rows=False),
        Group("tasks", lambda r, n: {"task_losses": r.random(3) + 0.1, "log_vars": r.standard_normal(3) * 0.5}, rows=False),
    )
}


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
        from lossd.kernels import get_function
        from lossd.kernels.params import resolve_params

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


def _cases() -> list[Case]:
    out: list[Case] = []
    for name in ("gaussian_nll", "huber", "log_cosh", "mae", "mse", "smooth_l1", "explained_variance", "r2", "rmse"):
        out.append(Case(name, name, "reg"))
    out += [
        Case("poisson_nll", "poisson_nll", "count"),
        Case("quantile", "quantile", "quant", {"quantiles": [0.1, 0.5, 0.9]}),
    ]
    for name in ("bce_with_logits", "dice", "dice_bce", "exponential", "hinge", "sigmoid_focal", "squared_hinge", "tversky"):
        out.append(Case(name, name, "seg"))
    for name in (
        "adaptive_label_smoothing",
        "cross_entropy",
        "focal",
        "multi_margin",
        "multiclass_hinge",
        "z_loss",
        "accuracy",
        "auroc",
        "average_precision",
        "brier",
        "confusion_matrix",
        "entropy",
        "f1",
        "log_loss",
        "precision",
        "recall",
        "adaptive_ece",
        "debiased_ece",
        "ece",
        "mce",
        "reliability_diagram",
        "temperature",
    ):
        out.append(Case(name, name, "cls"))
    out += [
        Case("cross_entropy_smoothed", "cross_entropy", "cls", {"label_smoothing": 0.1, "weight": [1.0, 2.0, 0.5, 1.0, 3.0]}),
        Case("cross_entropy_soft", "cross_entropy", "soft"),
        Case("top_k_accuracy", "top_k_accuracy", "cls", {"k": 2}),
        Case("auroc_binned", "auroc", "cls", {"bins": 64}),
        Case("average_precision_binned", "average_precision", "cls", {"bins": 64}),
        Case("f1_micro", "f1", "cls", {"average": "micro"}),
        Case("ece_l2", "ece", "cls", {"n_bins": 10, "norm": "l2"}),
        Case("ece_classwise", "ece", "cls", {"scope": "classwise"}),
        Case("accuracy_binary", "accuracy", "bin"),
        Case("auroc_binary", "auroc", "bin", roles={"logits": "logits", "targets": "targets"}),
        Case("average_precision_binary", "average_precision", "bin", roles={"logits": "logits", "targets": "targets"}),
        Case("brier_binary", "brier", "bin"),
        Case("log_loss_binary", "log_loss", "bin"),
        Case("ece_binary", "ece", "bin", roles={"logits": "logits", "targets": "targets"}),
        Case("adaptive_ece_binary", "adaptive_ece", "bin", roles={"logits": "logits", "targets": "targets"}),
        Case("bce_binary", "bce_with_logits", "bin", {"pos_weight": 2.0}),
        Case("nll", "nll", "lp"),
        Case("kl_div", "kl_div", "kl"),
        Case("distillation_kl", "distillation_kl", "distill", {"temperature": 2.0}),
        Case("lm_cross_entropy", "lm_cross_entropy", "lm"),
        Case("lm_cross_entropy_sequence", "lm_cross_entropy", "lm", {"normalization": "sequence"}),
        Case("perplexity", "perplexity", "lm"),
        Case("dpo", "dpo", "dpo", {"label_smoothing": 0.1}),
        Case("dpo_ipo", "dpo", "dpo", {"loss_type": "ipo"}),
        Case("pairwise_logistic", "pairwise_logistic", "pair", {"margin": 0.2}),
        Case("ppo_clip", "ppo_clip", "ppo", {"kl_coef": 0.1}),
        Case("moe_load_balancing", "moe_load_balancing", "moe"),
        Case("mrr", "mrr", "rank"),
        Case("recall_at_k", "recall_at_k", "rank", {"k": 3}),
        Case("recall_at_k_cosine", "recall_at_k", "rank", {"k": 2, "similarity": "cosine"}),
    ]
    # Non-splittable: the state is a sum of per-batch values.
    for name in ("arcface", "cosface", "sphereface"):
        out.append(Case(name, name, "emb"))
    for name in ("circle", "multi_similarity", "supcon", "nt_xent"):
        out.append(Case(name, name, "emb", roles={"embeddings": "embeddings", "labels": "labels"}))
    out += [
        Case("contrastive_pair", "contrastive_pair", "pairs"),
        Case("info_nce", "info_nce", "nce"),
        Case("triplet", "triplet", "trip"),
        Case("ctc", "ctc", "ctc"),
        Case("uncertainty_weighting", "uncertainty_weighting", "tasks"),
        Case("ppo_clip_normalized", "ppo_clip", "ppo", {"normalize_advantages": True}),
    ]
    return out


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
    from lossd.kernels import get_function

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
