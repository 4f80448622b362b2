"""A tensor no requested function reads is refused, naming it: a misspelt optional role would otherwise change nothing."""

from __future__ import annotations

import pytest
import torch

from lossd.kernels import Accumulator, InvalidInput, evaluate
from lossd.kernels.evaluate import prepare
from lossd.kernels.tensor_names import names_read


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"logits": torch.randn(16, 4, generator=g), "labels": torch.randint(0, 4, (16,), generator=g)}


def test_a_misspelt_optional_role_is_refused_with_the_name_meant() -> None:
    weights = torch.rand(16, dtype=torch.float64)
    with pytest.raises(InvalidInput) as info:
        evaluate({**_batch(), "weight": weights}, ["cross_entropy"])
    ((violation,),) = [info.value.violations]
    assert violation.field == "tensors.weight"
    assert "did you mean 'weights'?" in violation.description
    assert "they read: labels, logits, target_probs, weights" in violation.description
    weighted = evaluate({**_batch(), "weights": weights}, ["cross_entropy"])["cross_entropy"].value
    assert weighted != evaluate(_batch(), ["cross_entropy"])["cross_entropy"].value  # what the misspelling would have hidden


def test_accumulator_refuses_it_and_counts_nothing() -> None:
    acc = Accumulator(["cross_entropy", "accuracy"])
    acc.add(_batch())
    with pytest.raises(InvalidInput) as info:
        acc.add({**_batch(), "mask": torch.ones(16, dtype=torch.bool)})
    assert [v.field for v in info.value.violations] == ["tensors.mask"]
    assert acc.batches == 1 and acc.states["cross_entropy"].batches == 1


def test_each_unread_tensor_is_named_and_a_mapped_role_is_read_under_its_mapping() -> None:
    spec = {"name": "cross_entropy", "inputs": {"logits": "student"}}
    batch = _batch()
    tensors = {"student": batch["logits"], "labels": batch["labels"], "logits": batch["logits"], "extra": torch.zeros(3)}
    with pytest.raises(InvalidInput) as info:
        evaluate(tensors, [spec])
    assert [v.field for v in info.value.violations] == ["tensors.logits", "tensors.extra"]
    del tensors["logits"], tensors["extra"]
    assert evaluate(tensors, [spec])["cross_entropy"].value == pytest.approx(evaluate(batch, ["cross_entropy"])["cross_entropy"].value)


def test_a_tensor_one_function_reads_is_read() -> None:
    assert set(evaluate(_batch(), ["entropy", "accuracy"]).results) == {"entropy", "accuracy"}  # entropy reads no labels
    read = names_read(prepare(["entropy", {"name": "accuracy", "inputs": {"labels": "y"}, "alias": "acc"}]))
    assert read["logits"] == ["entropy.logits", "acc.logits"] and read["y"] == ["acc.labels"]


def test_the_list_of_names_read_is_bounded() -> None:
    specs = [{"name": "mse", "inputs": {"predictions": f"p{i}", "targets": f"t{i}"}, "alias": f"m{i}"} for i in range(20)]
    with pytest.raises(InvalidInput) as info:
        evaluate({"x": torch.zeros(2)}, specs)
    description = info.value.violations[0].description
    assert "and 29 more" in description and len(description) < 400  # 20 predictions, 20 targets and the weights: 41 names, 12 listed
