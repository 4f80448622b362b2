"""Memory stays flat over thousands of batches; the one growing state (exact AUROC/AP) is bounded by a setting.

Every splittable function but exact AUROC/AP keeps a fixed-size state: its
bytes after 3000 batches equal those after the first. Exact AUROC/AP
concatenate scores, and past ``exact_state_limit`` they refuse with
RESOURCE_EXHAUSTED naming the setting, in a run, a stream and a Finalize.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from integration.conftest import start_server
from integration.synthetic import CASES, Case, shard_batches, specs

from lossd.client import Client, ResourceExhaustedError
from lossd.client.distributed import finalize_files, save_states
from lossd.kernels import Accumulator, State, StateLimitExceeded, evaluate
from lossd.kernels.evaluate import prepare
from lossd.kernels.params import resolve_params
from lossd.kernels.registry import get_function
from lossd.kernels.tensor_names import names_read

BATCHES = 3000
SEED = 7


def is_exact_ranking(case: Case) -> bool:
    """Exact (unbinned) AUROC/AP: the state holds every score, by design."""
    fdef = get_function(case.name)
    return case.name in ("auroc", "average_precision") and resolve_params(fdef.params, case.params, case.alias)["bins"] is None


SPLITTABLE = [c for c in CASES if c.splittable]
FIXED = [c for c in SPLITTABLE if not is_exact_ranking(c)]
GROWING = [c for c in SPLITTABLE if is_exact_ranking(c)]


def footprint(state: State) -> int:
    """Bytes a state holds: its tensors and its metadata strings."""
    return state.nbytes()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: thread hand-offs would cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_growing_states_are_only_exact_auroc_and_average_precision() -> None:
    assert {c.name for c in GROWING} == {"auroc", "average_precision"}
    assert len(FIXED) > 50


def layout(case: Case) -> tuple[tuple[str, str], ...]:
    """Return a state's field names and merge operations: what decides how merging treats its memory."""
    return tuple(sorted((name, op.value) for name, op in get_function(case.name).fields.items()))


def one_per_layout(cases: list[Case]) -> list[Case]:
    """Return the first case of each state layout (exact AUROC/AP apart from binned)."""
    first: dict[tuple[object, ...], Case] = {}
    for c in cases:
        first.setdefault((layout(c), is_exact_ranking(c)), c)
    return list(first.values())


BY_LAYOUT = one_per_layout(SPLITTABLE)


def test_state_bytes_stay_flat_over_3000_batches(one_thread: None) -> None:
    """Every splittable case to 3200 batches; one case per state layout merged one batch at a time to 3000.

    12 real updates (1 to 12 rows each), then those batches' states merged
    one at a time to 100 batches, then each state with itself to 3200.
    """
    functions = specs(SPLITTABLE)
    read = names_read(prepare(functions))  # the groups' batches hold the tensors of their unsplittable cases too
    batches = [
        {name: t for name, t in b.items() if name in read}
        for b in shard_batches(sorted({c.group for c in SPLITTABLE}), SEED, 0, 12, min_rows=1, max_rows=12)
    ]
    per_batch = [evaluate(b, functions, return_state=True) for b in batches]
    acc = Accumulator(functions)
    sizes: dict[int, dict[str, int]] = {}
    for i in range(100):
        if i < len(batches):
            acc.add(batches[i])
        else:
            for alias, result in per_batch[i % len(batches)].results.items():
                assert result.state is not None
                acc.add_state(alias, result.state)
        sizes[i + 1] = {alias: footprint(s) for alias, s in acc.states.items()}
    scores_at_100 = {c.alias: acc.states[c.alias].fields["scores"].shape[0] for c in GROWING}
    for _ in range(5):  # 100 -> 3200 batches: merge each state with itself
        for alias, state in list(acc.states.items()):
            acc.add_state(alias, state)
    sizes[3200] = {alias: footprint(s) for alias, s in acc.states.items()}

    for c in FIXED:
        history = {n: s[c.alias] for n, s in sizes.items()}
        assert len(set(history.values())) == 1, f"{c.alias}: state bytes after n batches: {history}"
        assert acc.states[c.alias].batches == 3200
    for c in GROWING:  # every score of every batch is kept
        assert sizes[3200][c.alias] > sizes[100][c.alias] > sizes[12][c.alias] > sizes[1][c.alias], c.alias
        assert acc.states[c.alias].fields["scores"].shape[0] == 32 * scores_at_100[c.alias]
    values = acc.result()  # counts and sums of 3200 batches still finalize to numbers
    for c in FIXED:
        assert not any(np.isinf(v) for v in values[c.alias].values.values()), c.alias

    one_by_one = Accumulator(specs(BY_LAYOUT))
    read_by_one = names_read(one_by_one.prepared)
    for b in batches:
        one_by_one.add({name: t for name, t in b.items() if name in read_by_one})
    at_100 = {}
    for i in range(len(batches), BATCHES):
        for c in BY_LAYOUT:
            state = per_batch[i % len(batches)][c.alias].state
            assert state is not None
            one_by_one.add_state(c.alias, state)
        if i + 1 == 100:
            at_100 = {alias: footprint(s) for alias, s in one_by_one.states.items()}
    for c in BY_LAYOUT:
        after = footprint(one_by_one.states[c.alias])
        assert one_by_one.states[c.alias].batches == BATCHES
        if is_exact_ranking(c):
            assert after > at_100[c.alias], c.alias
        else:
            assert after == at_100[c.alias] == sizes[1][c.alias], (
                f"{c.alias}: {sizes[1][c.alias]} bytes after 1 batch, {at_100[c.alias]} after 100, {after} after {BATCHES}"
            )


def test_exact_state_limit_in_process() -> None:
    rng = np.random.default_rng(0)
    acc = Accumulator(["auroc", {"name": "auroc", "params": {"bins": 32}, "alias": "binned"}], exact_state_limit=100)
    for _ in range(3):
        acc.add({"logits": rng.standard_normal((30, 3)), "labels": rng.integers(0, 3, 30)})
    with pytest.raises(StateLimitExceeded, match="120 scores, over the limit of 100") as info:
        acc.add({"logits": rng.standard_normal((30, 3)), "labels": rng.integers(0, 3, 30)})
    assert info.value.setting == "exact_state_limit"


@pytest.fixture(scope="module")
def small_limit() -> Iterator[str]:
    """Start a server whose exact AUROC/AP states may hold 100 scores."""
    server = start_server(exact_state_limit=100)
    yield server.address
    server.stop()


def batch(rng: np.random.Generator, n: int = 40) -> dict[str, np.ndarray]:
    return {"logits": rng.standard_normal(n), "targets": (rng.random(n) < 0.5).astype(np.float64)}


def assert_names_the_setting(exc: ResourceExhaustedError) -> None:
    assert exc.setting == "exact_state_limit" and exc.reason == "STATE_LIMIT_EXCEEDED"
    assert "LOSSD_EXACT_STATE_LIMIT" in exc.message and "bins=" in exc.message


def test_run_over_the_exact_limit_is_resource_exhausted(small_limit: str) -> None:
    rng = np.random.default_rng(1)
    with Client(small_limit, timeout=30) as client:
        run = client.run(["auroc", "average_precision:bins=64"])
        for _ in range(3):  # exact scores stay client-side (never resent): the limit applies when they are merged
            run.update(batch(rng))
        with pytest.raises(ResourceExhaustedError) as info:
            run.result()
        assert_names_the_setting(info.value)
        assert run.batches == 3  # the refused merge left the run as it was
        binned = client.run("auroc:bins=64")
        for _ in range(10):  # a binned state never grows
            binned.update(batch(rng))


def test_stream_over_the_exact_limit_is_resource_exhausted(small_limit: str) -> None:
    rng = np.random.default_rng(2)
    with Client(small_limit, timeout=30) as client, pytest.raises(ResourceExhaustedError) as info:
        client.evaluate_stream((batch(rng) for _ in range(3)), "auroc")
    assert_names_the_setting(info.value)


def test_merging_ranks_over_the_exact_limit_is_resource_exhausted(small_limit: str, address: str, tmp_path) -> None:  # noqa: ANN001
    """Each rank is under the limit; their merge is not: Finalize refuses it the same way."""
    rng = np.random.default_rng(3)
    paths = []
    with Client(address, timeout=30) as client:  # the session server: no small limit
        for rank in range(3):
            run = client.run("auroc")
            run.update(batch(rng))
            paths.append(save_states(tmp_path / f"rank{rank}.lossd", run))
    with pytest.raises(ResourceExhaustedError) as info:
        finalize_files(small_limit, paths)
    assert_names_the_setting(info.value)
    assert finalize_files(address, paths)["auroc"].value > 0
