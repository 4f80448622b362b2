"""lossd.client.distributed without a server: state files, consistency checks, argument checks, a world of one."""

from __future__ import annotations

import datetime
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lossd.client.codec import encode_tensor
from lossd.client.diagnostics import merge_final_diagnostics as merged_diagnostics
from lossd.client.distributed import (
    STATE_FILE_MAGIC,
    StateFileError,
    check_consistent,
    finalize_files,
    gather_states,
    load_states,
    merge_run,
    named_states_of,
    read_state_file,
    save_states,
)
from lossd.client.evaluation import Diagnostic
from lossd.client.run import Run
from lossd.v1 import lossd_pb2 as pb


def state(function: str = "cross_entropy", params: str = '{"ignore_index":-100}', total: float = 1.5) -> pb.State:
    return pb.State(
        function=function, version=1, params_json=params, fields={"total": encode_tensor(np.array([total]), "total")}, batches=2
    )


def test_import_does_not_import_torch() -> None:
    code = "import lossd.client.distributed, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_state_file_round_trip(tmp_path: Path) -> None:
    states = {"ce": state(), "acc": state("accuracy", "{}")}
    path = save_states(tmp_path / "rank0.lossd", states, tags={"model": "m", "split": "validation"})
    assert path.read_bytes().startswith(STATE_FILE_MAGIC + b" 1\n")
    request = read_state_file(path)
    assert [(s.alias, s.state) for s in request.states] == list(states.items())
    assert request.tags == pb.Tags(model="m", split="validation")
    assert load_states([path]) == list(request.states)
    assert load_states(str(path)) == list(request.states)  # one path alone
    assert list(tmp_path.iterdir()) == [path]  # nothing left aside


def test_a_run_writes_its_states_and_tags_and_an_empty_run_an_empty_file(tmp_path: Path) -> None:
    run = Run(None, [pb.FunctionSpec(name="cross_entropy")], tags=pb.Tags(dataset="d"))  # type: ignore[arg-type]
    path = save_states(tmp_path / "empty.lossd", run)
    request = read_state_file(path)
    assert list(request.states) == [] and request.tags.dataset == "d"
    full = save_states(tmp_path / "full.lossd", {"ce": state()})
    assert [s.alias for s in load_states([path, full])] == ["ce"]  # a rank without batches adds nothing


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"PK\x03\x04 an npz file", "expected a lossd state file"),
        (b"", "expected a lossd state file"),
        (STATE_FILE_MAGIC + b" 2\n", "expected state file version 1, got '2'"),
        (STATE_FILE_MAGIC + b" 1\n\xff\xff\xff", "do not parse"),
    ],
)
def test_bad_state_files(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "bad.lossd"
    path.write_bytes(data)
    with pytest.raises(StateFileError, match=match):
        read_state_file(path)


def test_missing_state_file_and_no_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_states([tmp_path / "absent.lossd"])
    with pytest.raises(ValueError, match="at least one state file"):
        load_states([])


def named(alias: str, s: pb.State) -> pb.NamedState:
    return pb.NamedState(alias=alias, state=s)


def test_consistency_names_the_alias_and_the_sources() -> None:
    a = [named("ce", state()), named("acc", state("accuracy", "{}"))]
    assert check_consistent([a, [], a], ["rank 0", "rank 1", "rank 2"]) == a + a
    other_params = [named("ce", state(params='{"ignore_index":0}')), named("acc", state("accuracy", "{}"))]
    with pytest.raises(
        ValueError,
        match=r"alias 'ce': rank 0 has cross_entropy v1 with params \{\"ignore_index\":-100\}, but rank 2 has .*ignore_index\":0",
    ):
        check_consistent([a, [], other_params], ["rank 0", "rank 1", "rank 2"])
    with pytest.raises(ValueError, match=r"rank 1 lacks \['acc'\] compared with rank 0"):
        check_consistent([a, a[:1]], ["rank 0", "rank 1"])
    with pytest.raises(ValueError, match=r"rank 1 has extra \['x'\]"):
        check_consistent([a, [*a, named("x", state())]], ["rank 0", "rank 1"])
    with pytest.raises(ValueError, match=r"rank 0 holds several states for \['ce'\]"):
        check_consistent([[a[0], a[0], a[1]]], ["rank 0"])
    with pytest.raises(ValueError, match="one label per source"):
        check_consistent([a], [])


def test_load_states_refuses_files_of_different_functions(tmp_path: Path) -> None:
    one = save_states(tmp_path / "a.lossd", {"ce": state()})
    two = save_states(tmp_path / "b.lossd", {"ce": state("focal")})
    with pytest.raises(ValueError, match=f"alias 'ce': {one} has cross_entropy.*but {two} has focal"):
        load_states([one, two])


def test_finalize_files_checks_before_connecting(tmp_path: Path) -> None:
    empty = save_states(tmp_path / "empty.lossd", {})
    with pytest.raises(ValueError, match="expected states in at least one file"):
        finalize_files("127.0.0.1:1", [empty])
    a = save_states(tmp_path / "a.lossd", {"ce": state()}, tags={"split": "a"})
    b = save_states(tmp_path / "b.lossd", {"ce": state()}, tags={"split": "b"})
    with pytest.raises(ValueError, match="same tags"):
        finalize_files("127.0.0.1:1", [a, b])


def test_named_states_of_forms_and_errors() -> None:
    s = state()
    assert named_states_of({"ce": s}) == [named("ce", s)]
    assert named_states_of([("ce", s), named("x", s)]) == [named("ce", s), named("x", s)]
    assert named_states_of([]) == []
    with pytest.raises(TypeError, match="non-empty alias"):
        named_states_of({"": s})
    with pytest.raises(TypeError, match="lossd.v1.State"):
        named_states_of({"ce": "not a state"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="expected NamedStates"):
        named_states_of([s])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="expected a Run"):
        named_states_of(42)  # type: ignore[arg-type]


def test_merged_diagnostics_count_a_finding_once_per_batch() -> None:
    ranks = [
        Diagnostic("binned_estimate", "info", "old", "auroc", 5),
        Diagnostic("binned_estimate", "info", "old", "auroc", 3),
        Diagnostic("nan", "warning", "m", "ce", 1),
    ]
    final = [Diagnostic("binned_estimate", "info", "over 8 batches", "auroc", 1), Diagnostic("empty_bins", "info", "e", "ece", 1)]
    out = {(d.code, d.function): d for d in merged_diagnostics(ranks, final)}
    assert out[("binned_estimate", "auroc")] == Diagnostic("binned_estimate", "info", "over 8 batches", "auroc", 8)
    assert out[("nan", "ce")].count == 1 and out[("empty_bins", "ece")].count == 1


def test_merge_run_argument_checks() -> None:
    with pytest.raises(TypeError, match="expected a lossd.client.Run"):
        merge_run({"ce": state()})  # type: ignore[arg-type]
    run = Run(None, [pb.FunctionSpec(name="cross_entropy")])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a lossd.client.Client"):
        merge_run(run)


def test_gather_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group|needs torch"):
        gather_states({"ce": state()})


@pytest.fixture
def world_of_one(tmp_path: Path) -> Iterator[None]:
    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=30)
    )
    yield
    dist.destroy_process_group()


def test_gather_in_a_world_of_one(world_of_one: None) -> None:
    states = {"ce": state(), "acc": state("accuracy", "{}")}
    expected = [named(a, s) for a, s in states.items()]
    assert gather_states(states) == expected
    assert gather_states(states, dst=None) == expected
    assert gather_states({}, dst=None) == []
    for dst in (1, -1, "0", True):
        with pytest.raises(ValueError, match=r"expected dst to be the global rank of a group member \(0\.\.0\) or None"):
            gather_states(states, dst=dst)  # type: ignore[arg-type]
