"""One rank of the distributed test job; tests/integration/test_distributed.py starts several.

``run_rank`` evaluates the given function specs (every registered function,
one request per batch) over this rank's shard with a client run, then merges
across ranks in every way the helper offers, writing what the rank saw under
``out``:

* ``every-R.pb``: ``merge_run(run, dst=None)`` (a serialized EvaluateResponse)
* ``dst0.pb`` / ``dst-last.pb``: ``merge_run`` to rank 0 / to the last rank; ``none-dst0-R`` marks a None
* ``gathered-R.txt``: aliases of ``gather_states(run, dst=None)``, one per line
* ``rankR.lossd``: ``save_states`` of the run
* ``failed-R.txt``: the error of ``merge_run(dst=None)`` when rank 0 cannot reach the server
* ``mismatch-R.txt``: the error every rank raises when rank 2 changes one alias's parameters
* ``error-R.txt``: the traceback, when the rank failed (it then exits 1)

It imports torch.distributed and the client only: no server, no kernels.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from pathlib import Path

from integration.synthetic import GROUPS, shard_batches

TAGS = {"model": "m", "dataset": "synthetic"}


def run_rank(init: str, rank: int, world: int, address: str, seed: int, shards: tuple[int, ...], out: Path) -> None:
    """Run one rank's process; exit 1 (with ``error-R.txt``) when anything fails."""
    try:
        _run(init, rank, world, address, seed, shards, out)
    except BaseException:
        (out / f"error-{rank}.txt").write_text(traceback.format_exc())
        sys.exit(1)


def _run(init: str, rank: int, world: int, address: str, seed: int, shards: tuple[int, ...], out: Path) -> None:
    import torch.distributed as dist

    from lossd.client import Client
    from lossd.client.distributed import gather_states, merge_run, save_states

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks talk over loopback
    functions = json.loads((out / "functions.json").read_text())
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        with Client(address, timeout=120) as client:
            run = client.run(functions, tags={**TAGS, "split": f"shard-{rank}"})
            for batch in shard_batches(sorted(GROUPS), seed, rank, shards[rank]):
                run.update(batch)

            every = merge_run(run, dst=None, tags={**TAGS, "split": "all"})
            assert every is not None
            (out / f"every-{rank}.pb").write_bytes(every.response.SerializeToString(deterministic=True))

            for name, dst in (("dst0", 0), ("dst-last", world - 1)):
                result = merge_run(run, dst=dst)
                if rank == dst:
                    assert result is not None
                    (out / f"{name}.pb").write_bytes(result.response.SerializeToString(deterministic=True))
                else:
                    assert result is None, f"rank {rank} got a result for dst={dst}"
                    (out / f"none-{name}-{rank}").touch()

            gathered = gather_states(run, dst=None)
            assert gathered is not None
            (out / f"gathered-{rank}.txt").write_text("\n".join(s.alias for s in gathered))

            save_states(out / f"rank{rank}.lossd", run)

            with Client("127.0.0.1:1", timeout=10, attempts=1) as unreachable:  # rank 0's Finalize fails
                try:
                    merge_run(run, client=unreachable, dst=None)
                except Exception as exc:
                    (out / f"failed-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")

            states = run.states()
            if rank == 2:
                states["ece"].params_json = states["ece"].params_json.replace('"n_bins":15', '"n_bins":16')
            try:
                gather_states(states, dst=None)
            except ValueError as exc:
                (out / f"mismatch-{rank}.txt").write_text(str(exc))
            dist.barrier()
    finally:
        dist.destroy_process_group()
