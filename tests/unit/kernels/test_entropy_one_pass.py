"""Entropy asked for with cross-entropy comes from the first pass over the scores, with the same values."""

from __future__ import annotations

import torch

from lossd.kernels import FunctionSpec, evaluate
from lossd.kernels.batch import Batch, entropy_wanted
from lossd.kernels.evaluate import prepare
from lossd.kernels.row_stats import row_entropy

CPU = torch.device("cpu")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"scores": torch.randn(300, 17, generator=g) * 4, "labels": torch.randint(0, 17, (300,), generator=g)}


def test_entropy_wanted_names_the_entropy_inputs() -> None:
    prepared = prepare(
        [
            FunctionSpec("cross_entropy", {}, {"logits": "scores"}),
            FunctionSpec("entropy", {}, {"logits": "scores"}),
            FunctionSpec("entropy", {"input_kind": "probs"}, {"logits": "p"}, "h_probs"),
        ]
    )
    assert entropy_wanted(prepared) == {("scores", 1), ("log(p)", 1)}
    assert entropy_wanted(prepare([FunctionSpec("cross_entropy", {}, {})])) == frozenset()


def test_first_pass_computes_the_wanted_entropy_bit_for_bit() -> None:
    x = _tensors()["scores"]
    batch = Batch({"scores": x}, CPU, entropy_for=frozenset({("scores", 1)}))
    stats = batch.row_stats("scores", 1)  # as cross-entropy asks: no entropy requested
    assert stats.entropy is not None  # computed in the same pass, not left to a second one
    assert torch.equal(stats.entropy, row_entropy(x, 1))
    p = torch.softmax(x.double(), dim=1)
    torch.testing.assert_close(stats.entropy.double(), -(p * p.log()).sum(1), rtol=1e-5, atol=1e-5)  # float32 sums of 17 terms
    assert Batch({"scores": x}, CPU).row_stats("scores", 1).entropy is None  # nobody wants it: not computed


def test_values_equal_entropy_alone_and_after_cross_entropy() -> None:
    tensors = _tensors()
    inputs = {"logits": "scores"}
    together = evaluate(tensors, [FunctionSpec("cross_entropy", {}, inputs), FunctionSpec("entropy", {}, inputs)], device=CPU)
    alone = evaluate({"scores": tensors["scores"]}, [FunctionSpec("entropy", {}, inputs)], device=CPU)  # it reads no labels
    ce_alone = evaluate(tensors, [FunctionSpec("cross_entropy", {}, inputs)], device=CPU)
    assert together.results["entropy"].values == alone.results["entropy"].values
    assert together.results["cross_entropy"].values == ce_alone.results["cross_entropy"].values
