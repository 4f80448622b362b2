"""Exact evaluation across the ranks of a torch.distributed job, with lossd.

    lossd serve &                        # gRPC on 127.0.0.1:50051
    torchrun --nproc-per-node 4 examples/distributed_eval.py --server 127.0.0.1:50051 --check

Every rank evaluates its own shard with a client run (one ``Evaluate`` call
per batch, exact totals kept as mergeable states), then ``merge_run`` gathers
the ranks' states and merges them with one ``Finalize`` call: rank 0 prints
the values of the whole evaluation set, exactly those of one process that saw
every batch. ``--check`` makes rank 0 verify that against one request over all
shards. Shards here are synthetic and uneven (rank 1 has none).

To merge later or elsewhere, write one state file per rank instead::

    torchrun --nproc-per-node 4 examples/distributed_eval.py --server 127.0.0.1:50051 --states-dir states/
    lossd finalize --server 127.0.0.1:50051 states/*.lossd --json

Against a server with TLS and tokens, set the environment once for the job
(every rank's client reads it): ``LOSSD_SERVER``, ``LOSSD_TLS_CA_FILE`` and
``LOSSD_TOKEN`` (or ``LOSSD_TOKEN_FILE``); or pass ``--tls-ca`` / ``--token-file``.

The ranks need only the client and torch (``pip install lossd-client torch``).
Gloo on CPU is enough; with GPUs and NCCL only a few kilobytes travel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lossd.client import Client
from lossd.client.distributed import merge_run, save_states

FUNCTIONS = ["cross_entropy", "accuracy", "top_k_accuracy:k=3", "ece:n_bins=15", "brier", "auroc:bins=1000", "f1"]
CLASSES = 10
BATCHES_PER_RANK = (7, 0, 12, 3)  # uneven on purpose; ranks past the fourth repeat the pattern


def shard(rank: int) -> list[dict[str, np.ndarray]]:
    """Make one rank's batches: logits of a ``CLASSES``-way model and labels, random sizes."""
    rng = np.random.default_rng(rank)
    batches = []
    for _ in range(BATCHES_PER_RANK[rank % len(BATCHES_PER_RANK)]):
        n = int(rng.integers(16, 65))
        labels = rng.integers(0, CLASSES, n)
        logits = rng.standard_normal((n, CLASSES)).astype(np.float32)
        logits[np.arange(n), labels] += 1.5  # a model that is right more often than chance
        batches.append({"logits": logits, "labels": labels})
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default=None, help="lossd gRPC address HOST:PORT (default: LOSSD_SERVER, then 127.0.0.1:50051)")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM roots of the server's certificate (default: LOSSD_TLS_CA_FILE)")
    parser.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token (default: LOSSD_TOKEN[_FILE])")
    parser.add_argument("--states-dir", type=Path, help="write each rank's states there (for `lossd finalize`) instead of merging")
    parser.add_argument("--check", action="store_true", help="rank 0 compares the merged values with one request over every shard")
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)  # torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        with Client(args.server, ca_file=args.tls_ca, token_file=args.token_file) as client:
            run = client.run(FUNCTIONS, tags={"model": "example", "dataset": "synthetic", "split": "validation"})
            for batch in shard(rank):
                run.update(batch)

            if args.states_dir is not None:
                args.states_dir.mkdir(parents=True, exist_ok=True)
                path = save_states(args.states_dir / f"rank{rank:05d}.lossd", run)  # a rank without batches writes an empty file
                print(f"rank {rank}: {run.batches} batches -> {path}", flush=True)
                return

            result = merge_run(run)  # rank 0 gets the values; dst=None would give them to every rank
            if result is None:
                return
            print(json.dumps(result.to_json(), indent=2))
            print(f"{result.batches} batches over {world} ranks", flush=True)
            if args.check:
                every = [b for r in range(world) for b in shard(r)]
                whole = client.evaluate({k: np.concatenate([b[k] for b in every]) for k in ("logits", "labels")}, FUNCTIONS)
                worst = max(
                    abs(result[alias].values[k] - v) / max(abs(v), 1e-300)
                    for alias in whole
                    for k, v in whole[alias].values.items()
                    if not math.isnan(v)
                )
                print(f"check: largest relative difference from one request over all shards: {worst:.2e}")
                if worst > 1e-9:
                    raise SystemExit("check failed: the merged values differ from the whole-data values")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
