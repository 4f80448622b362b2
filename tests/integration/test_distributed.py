"""Exact totals across ranks: a 4-process torch.distributed (gloo) job over uneven shards, and state files.

One job evaluates every registered function (one request per batch, all
functions in it) over shards of 5, 0, 17 and 31 batches of random sizes, then
merges with ``lossd.client.distributed``. Splittable functions must give the
values of the concatenated data within 1e-9 relative; non-splittable ones (and
adaptive_ece, whose multi-batch value is a documented histogram estimate) the
values of the same batches merged in one process.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from integration import distributed_worker
from integration.synthetic import BATCH_DEPENDENT, CASES, GROUPS, SKIPPED, Case, concat, shard_batches, specs

from helpers import assert_close
from lossd.client import Client, EvaluationResult
from lossd.client.distributed import finalize_files, load_states, read_state_file, save_states
from lossd.kernels import all_functions
from lossd.v1 import lossd_pb2 as pb

WORLD = 4
SHARDS = (5, 0, 17, 31)  # rank 1 sees no batch
SEED = 20240611
RTOL = 1e-9

WHOLE = [c for c in CASES if c.whole_data]
SAME_BATCHES = [c for c in CASES if not c.whole_data]


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Client]:
    with Client(address, timeout=120) as c:
        yield c


def all_batches(shards: Sequence[int] = SHARDS) -> list[dict[str, np.ndarray]]:
    return [b for rank, n in enumerate(shards) for b in shard_batches(sorted(GROUPS), SEED, rank, n)]


def row_groups(cases: Sequence[Case]) -> list[str]:
    return sorted({c.group for c in cases})


@pytest.fixture(scope="module")
def whole(client: Client) -> EvaluationResult:
    """Splittable functions on the concatenation of every rank's batches: one request."""
    groups = row_groups(WHOLE)
    batches = [{k: v for k, v in b.items() if k.split("_", 1)[0] in groups} for b in all_batches()]
    return client.evaluate(concat(batches, groups, SEED), specs(WHOLE))


@pytest.fixture(scope="module")
def same_batches(client: Client) -> EvaluationResult:
    """Every function over the same batches, merged in one process (a stream): the reference of the batch-dependent ones."""
    return client.evaluate_stream(iter(all_batches()), specs(CASES))


@pytest.fixture(scope="module")
def job(address: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the 4-rank job once; returns the folder of what its ranks wrote.

    The ranks are forked by a forkserver that imported torch once: four
    processes importing torch side by side would take most of the time.
    """
    out = tmp_path_factory.mktemp("distributed")
    (out / "functions.json").write_text(json.dumps(specs(CASES)))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch.distributed", "lossd.client.distributed", "integration.distributed_worker"])
    init = f"file://{out / 'rendezvous'}"
    procs = [ctx.Process(target=distributed_worker.run_rank, args=(init, r, WORLD, address, SEED, SHARDS, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240
    while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):  # one rank failed: the others would wait for it
            break
        time.sleep(0.1)
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join(30)
    failed = [f"rank {r} exited {p.exitcode}:\n{_text(out / f'error-{r}.txt')}" for r, p in enumerate(procs) if p.exitcode != 0]
    assert not failed, "\n\n".join(failed)
    return out


def _text(path: Path) -> str:
    return path.read_text()[-4000:] if path.exists() else "(no traceback: killed, or it died before writing one)"


def response(path: Path) -> EvaluationResult:
    return EvaluationResult(pb.EvaluateResponse.FromString(path.read_bytes()))


def assert_same(merged: EvaluationResult, reference: EvaluationResult, aliases: Sequence[str]) -> None:
    for alias in aliases:
        m, w = merged[alias], reference[alias]
        assert set(m.values) == set(w.values) and set(m.tensors) == set(w.tensors), alias
        for key, value in w.values.items():
            if math.isnan(value):
                assert math.isnan(m.values[key]), f"{alias}.{key}: merged {m.values[key]}, expected NaN"
            else:
                assert_close(m.values[key], value, rtol=RTOL, atol=1e-12, what=f"{alias}.{key}")
        for key, t in w.tensors.items():
            assert_close(m.tensors[key], t, rtol=RTOL, atol=1e-12, what=f"{alias}.{key}")
        assert m.denominator_kind == w.denominator_kind, alias
        if w.denominator is None:
            assert m.denominator is None, alias
        else:
            assert m.denominator is not None and math.isclose(m.denominator, w.denominator, rel_tol=RTOL), alias


def test_every_registered_function_has_a_case() -> None:
    names = {f.name for f in all_functions()}
    covered = {c.name for c in CASES}
    assert names - covered - set(SKIPPED) == set(), "add a synthetic case (or a reason to SKIPPED)"
    splittable = {f.name for f in all_functions() if f.splittable}
    assert splittable - {c.name for c in WHOLE} - set(BATCH_DEPENDENT) - set(SKIPPED) == set()


@pytest.mark.parametrize("name", ["every-0.pb", "every-1.pb", "every-2.pb", "every-3.pb", "dst0.pb", "dst-last.pb"])
def test_merged_ranks_equal_the_whole_data(job: Path, whole: EvaluationResult, name: str) -> None:
    merged = response(job / name)
    assert_same(merged, whole, [c.alias for c in WHOLE])
    assert merged.batches == sum(SHARDS)


@pytest.mark.parametrize("name", ["every-0.pb", "every-3.pb", "dst0.pb"])
def test_merged_ranks_equal_one_process_over_the_same_batches(job: Path, same_batches: EvaluationResult, name: str) -> None:
    assert_same(response(job / name), same_batches, [c.alias for c in SAME_BATCHES])


def test_adaptive_ece_histogram_is_the_whole_data_one(job: Path, client: Client) -> None:
    (case,) = [c for c in CASES if c.alias == "adaptive_ece"]
    batches = [{k: v for k, v in b.items() if k.startswith(f"{case.group}_")} for b in all_batches()]
    whole = client.evaluate(concat(batches, [case.group], SEED), specs([case]))
    merged = response(job / "dst0.pb")["adaptive_ece"]
    assert_close(merged.values["histogram_value"], whole["adaptive_ece"].values["histogram_value"], rtol=RTOL, what="histogram_value")
    assert merged.values["exact"] == 0.0


def test_every_rank_gets_the_same_bytes_and_others_none(job: Path) -> None:
    bodies = {(job / f"every-{r}.pb").read_bytes() for r in range(WORLD)}
    assert len(bodies) == 1
    assert sorted(p.name for p in job.glob("none-*")) == sorted(
        [f"none-dst0-{r}" for r in range(1, WORLD)] + [f"none-dst-last-{r}" for r in range(WORLD - 1)]
    )
    expected = [c.alias for c in CASES] * sum(1 for n in SHARDS if n)  # the empty rank contributes nothing
    for r in range(WORLD):
        assert (job / f"gathered-{r}.txt").read_text().split("\n") == expected


def test_merged_diagnostics_add_up_over_ranks(job: Path) -> None:
    merged = response(job / "dst0.pb")
    codes = {(d.code, d.function): d.count for d in merged.diagnostics}
    # Binned AUROC reports its estimate once per batch on every rank.
    assert codes.get(("binned_estimate", "auroc_binned")) == sum(SHARDS)


def test_mismatched_functions_raise_on_every_rank(job: Path) -> None:
    for r in range(WORLD):
        message = (job / f"mismatch-{r}.txt").read_text()
        assert "alias 'ece'" in message and "rank 2" in message and '"n_bins":16' in message, message


def test_a_failed_finalize_reaches_every_rank(job: Path) -> None:
    assert (job / "failed-0.txt").read_text().startswith("UnavailableError:")
    for r in range(1, WORLD):
        message = (job / f"failed-{r}.txt").read_text()
        assert message.startswith("MergeError: the merge on rank 0 failed: UnavailableError"), message


def test_state_files_of_the_job_finalize_to_the_whole_data(job: Path, address: str, whole: EvaluationResult) -> None:
    files = sorted(job.glob("rank*.lossd"))
    assert len(files) == WORLD
    assert read_state_file(job / "rank1.lossd").states == []  # the rank without batches
    assert read_state_file(job / "rank0.lossd").tags.split == "shard-0"
    with pytest.raises(ValueError, match="same tags"):
        finalize_files(address, files)
    merged = finalize_files(address, files, tags={"model": "m", "dataset": "synthetic", "split": "all"})
    assert_same(merged, whole, [c.alias for c in WHOLE])


def test_state_files_written_per_rank_merge_in_one_finalize(client: Client, address: str, tmp_path: Path) -> None:
    """No torch.distributed: each "rank" runs its shard and writes a file; one Finalize merges them."""
    shards = (3, 0, 1, 4)
    groups = row_groups(WHOLE)
    functions = specs(WHOLE)
    paths = []
    for rank, n in enumerate(shards):
        run = client.run(functions, tags={"model": "m", "dataset": "synthetic", "split": "validation"})
        for batch in shard_batches(groups, SEED + 1, rank, n):
            run.update(batch)
        paths.append(save_states(tmp_path / f"rank{rank}.lossd", run))
    states = load_states(paths)
    assert len(states) == len(functions) * 3
    merged = client.finalize(states)
    batches = [b for rank, n in enumerate(shards) for b in shard_batches(groups, SEED + 1, rank, n)]
    reference = client.evaluate(concat(batches, groups, SEED + 1), functions)
    assert_same(merged, reference, [c.alias for c in WHOLE])
    assert merged.batches == sum(shards)
    from_files = finalize_files(address, paths)
    assert from_files.to_json()["results"].keys() == merged.to_json()["results"].keys()
    assert_same(from_files, merged, [c.alias for c in WHOLE])


# -- over TLS with a token ---------------------------------------------------------------------

TLS_TOKEN = "distributed-test-token-0123456789"
TLS_FUNCTIONS = ["cross_entropy", "accuracy", "ece:n_bins=10"]


def tls_shard(rank: int) -> list[dict[str, np.ndarray]]:
    """Three batches of 5-class logits and labels of random sizes for ``rank``."""
    rng = np.random.default_rng([SEED, rank])
    sizes = rng.integers(4, 20, 3)
    return [{"logits": rng.standard_normal((int(n), 5)).astype(np.float32), "labels": rng.integers(0, 5, int(n))} for n in sizes]


def tls_rank(init: str, rank: int, world: int, address: str, certs: Path, out: Path) -> None:
    """One rank of the TLS job: a run over its shard, ``merge_run(dst=None)``, and a state file (in a forked process)."""
    import datetime
    import os
    import sys
    import traceback

    import torch.distributed as dist

    from lossd.client.distributed import merge_run

    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        try:
            with Client(address, ca_file=certs / "ca.pem", token=TLS_TOKEN, timeout=60) as client:
                run = client.run(TLS_FUNCTIONS)
                for batch in tls_shard(rank):
                    run.update(batch)
                merged = merge_run(run, dst=None)
                assert merged is not None
                (out / f"tls-{rank}.pb").write_bytes(merged.response.SerializeToString(deterministic=True))
                save_states(out / f"tls-rank{rank}.lossd", run)
        finally:
            dist.destroy_process_group()
    except BaseException:
        (out / f"error-{rank}.txt").write_text(traceback.format_exc())
        sys.exit(1)


def test_merge_run_and_state_files_over_tls(client: Client, tmp_path: Path) -> None:
    import subprocess
    import sys

    from integration.conftest import start_server

    certs = tmp_path / "certs"
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_certs.py"), "--out", str(certs)], check=True, capture_output=True, timeout=60
    )
    (certs / "server-tokens").write_text(f"ranks:{TLS_TOKEN}\n")
    server = start_server(
        tls_cert_file=certs / "server.pem", tls_key_file=certs / "server-key.pem", auth_tokens_file=certs / "server-tokens"
    )
    try:
        address = f"localhost:{server.address.rsplit(':', 1)[1]}"
        ctx = multiprocessing.get_context("forkserver")
        init = f"file://{tmp_path / 'rendezvous'}"
        procs = [ctx.Process(target=tls_rank, args=(init, r, 2, address, certs, tmp_path)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(180)
            if p.exitcode is None:
                p.kill()
        failed = [f"rank {r} exited {p.exitcode}:\n{_text(tmp_path / f'error-{r}.txt')}" for r, p in enumerate(procs) if p.exitcode != 0]
        assert not failed, "\n\n".join(failed)
        with Client(address, ca_file=certs / "ca.pem", token=TLS_TOKEN) as secured:
            from_files = finalize_files(secured, sorted(tmp_path.glob("tls-rank*.lossd")))
    finally:
        server.stop()
    batches = [b for rank in range(2) for b in tls_shard(rank)]
    reference = client.evaluate_stream(iter(batches), TLS_FUNCTIONS)  # the plaintext session server, same batches in one process
    merged = [response(tmp_path / f"tls-{r}.pb") for r in range(2)]
    assert merged[0].response == merged[1].response
    for result in (merged[0], from_files):
        assert_same(result, reference, list(reference))
