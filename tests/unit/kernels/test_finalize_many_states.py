"""finalize_states over many states: bit for bit the pairwise merge and one evaluation, in linear time, cancellable."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lossd.kernels import State, evaluate, finalize_states, get_function
from lossd.kernels import state as state_module
from lossd.kernels.cancellation import Cancelled, CancelToken, DeadlineExceeded, cancellable
from lossd.kernels.errors import StateLimitExceeded
from lossd.kernels.state import merge_fields

ROWS = 20  # scores per exact state


def binary(n: int) -> dict[str, torch.Tensor]:
    return {"logits": torch.randn(n, dtype=torch.float64), "targets": (torch.rand(n) < 0.5).double()}


def chunks(tensors: dict[str, torch.Tensor], rows: int) -> Iterator[dict[str, torch.Tensor]]:
    n = next(iter(tensors.values())).shape[0]
    for start in range(0, n, rows):
        yield {k: v[start : start + rows] for k, v in tensors.items()}


def states_of(tensors: dict[str, torch.Tensor], name: str) -> list[State]:
    """One state per ROWS-row chunk, each from its own evaluation."""
    out = []
    for part in chunks(tensors, ROWS):
        state = evaluate(part, [name], return_state=True)[name].state
        assert state is not None
        out.append(state)
    return out


def split_exact_state(whole: State, parts: int) -> list[State]:
    """The exact AUROC state of one evaluation cut into ``parts`` states of ROWS scores (what per-chunk updates give)."""
    fields = whole.fields
    return [
        State(
            whole.function,
            whole.version,
            whole.params,
            {**fields, "scores": fields["scores"][i * ROWS : (i + 1) * ROWS], "labels": fields["labels"][i * ROWS : (i + 1) * ROWS]},
        )
        for i in range(parts)
    ]


def pairwise(states: list[State]) -> State:
    """The merge finalize_states did before: one merge_fields per state, left to right."""
    ops = get_function(states[0].function).fields
    merged = states[0]
    for s in states[1:]:
        merged = merge_fields(merged, s, ops, concat_limit=10_000_000, path="states")
    return merged


def assert_same_state(a: State, b: State) -> None:
    assert (a.function, a.version, a.params, a.batches) == (b.function, b.version, b.params, b.batches)
    assert set(a.fields) == set(b.fields)
    for name in a.fields:
        x, y = a.fields[name], b.fields[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.numpy().tobytes() == y.numpy().tobytes(), f"{a.function}.{name} differs from the pairwise merge"


def test_split_states_are_what_per_chunk_updates_give() -> None:
    data = binary(5 * ROWS)
    whole = evaluate(data, ["auroc"], return_state=True)["auroc"].state
    assert whole is not None
    for split, updated in zip(split_exact_state(whole, 5), states_of(data, "auroc"), strict=True):
        assert_same_state(split, updated)


def test_5000_exact_states_finalize_to_one_evaluation_bit_for_bit() -> None:
    n = 5000
    data = binary(n * ROWS)
    whole = evaluate(data, ["auroc"], return_state=True)["auroc"]
    assert whole.state is not None
    out = finalize_states([("auroc", s) for s in split_exact_state(whole.state, n)], return_state=True)["auroc"]
    assert out.values == whole.values  # exact equality, NaN-free data
    assert out.state is not None and out.state.batches == n
    assert torch.equal(out.state.fields["scores"], whole.state.fields["scores"])
    assert torch.equal(out.state.fields["labels"], whole.state.fields["labels"])


@pytest.mark.parametrize("name", ["auroc", "r2"])  # r2: MOMENTS, SUM, MIN and MAX fields, summed in order
def test_50_states_finalize_to_the_pairwise_merge_bit_for_bit(name: str) -> None:
    data = binary(50 * ROWS) if name == "auroc" else {"predictions": torch.randn(50 * ROWS, 3), "targets": torch.randn(50 * ROWS, 3)}
    states = states_of(data, name)
    out = finalize_states([(name, s) for s in states], return_state=True)[name]
    reference = pairwise(states)
    assert out.state is not None
    assert_same_state(out.state, reference)
    assert out.values == finalize_states([(name, reference)])[name].values


def test_exact_fields_are_concatenated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pairwise merging concatenated the growing buffer once per state: quadratic copying."""
    n = 5000
    whole = evaluate(binary(n * ROWS), ["auroc"], return_state=True)["auroc"].state
    assert whole is not None
    cat = torch.cat
    calls: list[int] = []

    def counting_cat(tensors: list[torch.Tensor], *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(len(tensors))
        return cat(tensors, *args, **kwargs)  # type: ignore[arg-type]

    states = split_exact_state(whole, n)
    monkeypatch.setattr(torch, "cat", counting_cat)
    finalize_states([("auroc", s) for s in states])
    concat_fields = sum(op is state_module.MergeOp.CONCAT for op in get_function("auroc").fields.values())
    assert calls.count(n) == concat_fields  # scores and labels: all n parts at once
    assert len(calls) <= 2 * concat_fields + 10, f"{len(calls)} torch.cat calls for {n} states"


def test_limit_is_checked_on_the_total_before_concatenating() -> None:
    whole = evaluate(binary(100 * ROWS), ["auroc"], return_state=True)["auroc"].state
    assert whole is not None
    states = [("auroc", s) for s in split_exact_state(whole, 100)]
    with pytest.raises(StateLimitExceeded, match=rf"would hold {50 * ROWS + ROWS} scores, over the limit of {50 * ROWS}"):
        finalize_states(states, exact_state_limit=50 * ROWS)


def test_a_cancelled_token_stops_the_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 5000
    whole = evaluate(binary(n * ROWS), ["auroc"], return_state=True)["auroc"].state
    assert whole is not None
    states = [("auroc", s) for s in split_exact_state(whole, n)]
    token = CancelToken()
    merged = 0
    add = state_module._Merge.add

    def cancel_midway(self: state_module._Merge, b: State) -> None:
        nonlocal merged
        merged += 1
        if merged == 1000:  # the client goes away while the states merge
            token.cancel()
        add(self, b)

    monkeypatch.setattr(state_module._Merge, "add", cancel_midway)
    with cancellable(token), pytest.raises(Cancelled, match="cancelled by its caller"):
        finalize_states(states)
    assert 1000 <= merged <= 1000 + state_module.MERGES_PER_CHECK


def test_a_past_deadline_stops_the_merge() -> None:
    whole = evaluate(binary(1000 * ROWS), ["auroc"], return_state=True)["auroc"].state
    assert whole is not None
    with cancellable(CancelToken(deadline=0.0)), pytest.raises(DeadlineExceeded, match="past its deadline"):
        finalize_states([("auroc", s) for s in split_exact_state(whole, 1000)])
