"""The registry holds every function of CATALOGUE.md under its public name and aliases."""

from __future__ import annotations

from lossd.kernels import all_functions, get_function

CATALOGUE = {
    "regression": ["mse", "mae", "huber", "smooth_l1", "log_cosh", "quantile", "gaussian_nll", "poisson_nll", "rmse", "r2", "explained_variance"],
    "binary": ["bce_with_logits", "hinge", "squared_hinge", "exponential", "sigmoid_focal", "dice", "dice_bce", "tversky"],
    "classification": [
        "cross_entropy", "nll", "kl_div", "distillation_kl", "multi_margin", "multiclass_hinge", "focal", "adaptive_label_smoothing", "z_loss",
    ],
    "sequence": ["lm_cross_entropy", "ctc"],
    "embedding": [
        "info_nce", "nt_xent", "supcon", "triplet", "contrastive_pair", "multi_similarity", "circle", "arcface", "cosface", "sphereface",
    ],
    "preference": ["pairwise_logistic", "dpo", "ppo_clip", "moe_load_balancing", "uncertainty_weighting"],
    "metric": [
        "accuracy", "top_k_accuracy", "precision", "recall", "f1", "confusion_matrix", "auroc", "average_precision", "log_loss", "brier",
        "entropy", "perplexity", "recall_at_k", "mrr",
    ],
    "calibration": ["ece", "mce", "debiased_ece", "adaptive_ece", "reliability_diagram", "temperature"],
}  # fmt: skip
ALIASES = {"l1": "mae", "bradley_terry": "pairwise_logistic"}


def test_every_catalogue_function_is_registered() -> None:
    registered = {f.name for f in all_functions()}
    missing = sorted({n for names in CATALOGUE.values() for n in names} - registered)
    assert not missing, f"CATALOGUE.md functions missing from the registry: {missing}"


def test_aliases_resolve() -> None:
    for alias, name in ALIASES.items():
        assert get_function(alias).name == name


def test_embedding_functions_are_not_splittable() -> None:
    for name in CATALOGUE["embedding"]:
        assert not get_function(name).splittable, name
