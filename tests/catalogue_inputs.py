"""A valid, well-formed batch for every registered function, as numpy arrays.

Shared by the diagnostics tests (clean data raises no diagnostic) and the
catalogue-wide error tests (each error case breaks one role of a request that
is otherwise valid).  Inputs are random but clean: logits are unnormalized
normal draws, labels cover several classes, probabilities are distributions,
lengths are feasible.  ``ROLE_GROUPS`` names the functions that need one role
of a group rather than a fixed role (a missing group is reported under any of
its names).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["valid_inputs", "INPUTS", "ROLE_GROUPS"]

K = 4  # classes
D = 6  # embedding width
T, V = 5, 7  # sequence length, vocabulary

Arrays = dict[str, np.ndarray]
Maker = Callable[[np.random.Generator, int], Arrays]


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _regression(rng: np.random.Generator, n: int) -> Arrays:
    return {"predictions": _normal(rng, n), "targets": _normal(rng, n)}


def _multiclass(rng: np.random.Generator, n: int) -> Arrays:
    return {"logits": _normal(rng, n, K), "labels": np.arange(n) % K}  # every class present, none rare


def _binary(rng: np.random.Generator, n: int) -> Arrays:
    return {"logits": _normal(rng, n, 3), "targets": rng.integers(0, 2, (n, 3)).astype(np.float32)}


def _segmentation(rng: np.random.Generator, n: int) -> Arrays:
    return {"logits": _normal(rng, 2, 3, 5, 5), "targets": rng.integers(0, 2, (2, 3, 5, 5)).astype(np.float32)}


def _tokens(rng: np.random.Generator, n: int) -> Arrays:
    return {"logits": _normal(rng, 3, T, V), "labels": rng.integers(0, V, (3, T))}


def _embeddings_with_labels(rng: np.random.Generator, n: int) -> Arrays:
    return {"embeddings": _normal(rng, n, D), "labels": np.arange(n) % 3}


def _margin_softmax(rng: np.random.Generator, n: int) -> Arrays:
    return {**_embeddings_with_labels(rng, n), "class_weights": _normal(rng, D, 3)}


def _retrieval(rng: np.random.Generator, n: int) -> Arrays:
    return {"query": _normal(rng, n, D), "keys": _normal(rng, n + 3, D), "relevant": rng.integers(0, n + 3, n)}


def _log_probs(rng: np.random.Generator, n: int) -> Arrays:
    return {"log_probs": np.log(_softmax(_normal(rng, n, K))).astype(np.float32), "labels": np.arange(n) % K}


def _kl(rng: np.random.Generator, n: int) -> Arrays:
    return {"log_probs": np.log(_softmax(_normal(rng, n, K))).astype(np.float32), "target": _softmax(_normal(rng, n, K)).astype(np.float32)}


def _ctc(rng: np.random.Generator, n: int) -> Arrays:
    return {
        "log_probs": np.log(_softmax(_normal(rng, 10, 3, 5), axis=2)).astype(np.float32),
        "targets": np.array([[1, 2, 3, 4], [2, 3, 1, 1], [4, 1, 0, 0]]),
        "input_lengths": np.array([10, 9, 8]),
        "target_lengths": np.array([4, 3, 2]),
    }


def _dpo(rng: np.random.Generator, n: int) -> Arrays:
    roles = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
    return {r: -np.abs(_normal(rng, n)) - 1 for r in roles}


INPUTS: dict[str, Maker] = {
    **dict.fromkeys(("mse", "mae", "huber", "smooth_l1", "log_cosh", "quantile", "rmse", "r2", "explained_variance"), _regression),
    "poisson_nll": lambda rng, n: {"predictions": _normal(rng, n), "targets": rng.poisson(2.0, n).astype(np.float32)},
    "gaussian_nll": lambda rng, n: {**_regression(rng, n), "variance": np.abs(_normal(rng, n)) + 0.5},
    **dict.fromkeys(("bce_with_logits", "hinge", "squared_hinge", "exponential", "sigmoid_focal"), _binary),
    **dict.fromkeys(("dice", "dice_bce", "tversky"), _segmentation),
    **dict.fromkeys(("cross_entropy", "focal", "multi_margin", "multiclass_hinge", "adaptive_label_smoothing"), _multiclass),
    **dict.fromkeys(
        ("accuracy", "top_k_accuracy", "precision", "recall", "f1", "confusion_matrix", "auroc", "average_precision"), _multiclass
    ),
    **dict.fromkeys(("log_loss", "brier", "ece", "mce", "debiased_ece", "adaptive_ece", "reliability_diagram", "temperature"), _multiclass),
    "z_loss": lambda rng, n: {"logits": _normal(rng, n, K)},
    "entropy": lambda rng, n: {"logits": _normal(rng, n, K)},
    "nll": _log_probs,
    "kl_div": _kl,
    "distillation_kl": lambda rng, n: {"logits": _normal(rng, n, K), "teacher_logits": _normal(rng, n, K)},
    "lm_cross_entropy": _tokens,
    "perplexity": _tokens,
    "ctc": _ctc,
    "info_nce": lambda rng, n: {"query": _normal(rng, n, D), "keys": _normal(rng, n, D)},
    "nt_xent": lambda rng, n: {"embeddings": _normal(rng, 2 * (n // 2), D)},
    **dict.fromkeys(("supcon", "multi_similarity", "circle"), _embeddings_with_labels),
    **dict.fromkeys(("arcface", "cosface", "sphereface"), _margin_softmax),
    "triplet": lambda rng, n: {"anchor": _normal(rng, n, D), "positive": _normal(rng, n, D), "negative": _normal(rng, n, D)},
    "contrastive_pair": lambda rng, n: {
        "x1": _normal(rng, n, D),
        "x2": _normal(rng, n, D),
        "similar": (np.arange(n) % 2).astype(np.float32),
    },
    "pairwise_logistic": lambda rng, n: {"chosen_scores": _normal(rng, n), "rejected_scores": _normal(rng, n)},
    "dpo": _dpo,
    "ppo_clip": lambda rng, n: {"logp_new": -np.abs(_normal(rng, n)), "logp_old": -np.abs(_normal(rng, n)), "advantages": _normal(rng, n)},
    "moe_load_balancing": lambda rng, n: {"router_logits": _normal(rng, n, 4)},
    "uncertainty_weighting": lambda rng, n: {"task_losses": np.abs(_normal(rng, 3)), "log_vars": _normal(rng, 3)},
    **dict.fromkeys(("recall_at_k", "mrr"), _retrieval),
}

# Functions that read one role of a group (labels or targets; log_probs or logits; ...):
# with none of them sent, the error may name any member.
ROLE_GROUPS: dict[str, frozenset[str]] = {
    **dict.fromkeys(
        (
            "accuracy",
            "auroc",
            "average_precision",
            "brier",
            "confusion_matrix",
            "f1",
            "log_loss",
            "precision",
            "recall",
            "ece",
            "mce",
            "debiased_ece",
            "adaptive_ece",
            "reliability_diagram",
            "temperature",
        ),
        frozenset({"labels", "targets"}),
    ),
    "cross_entropy": frozenset({"labels", "target_probs"}),
    "ctc": frozenset({"log_probs", "logits"}),
}


def valid_inputs(name: str, rng: np.random.Generator, n: int = 12) -> Arrays:
    """Make a valid batch of about ``n`` rows for the function ``name`` (KeyError if the table lacks it)."""
    return INPUTS[name](rng, n)
