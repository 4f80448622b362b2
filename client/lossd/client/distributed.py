r"""Exact totals across the ranks of a distributed job (torch.distributed); state files re-exported.

Every rank runs its own shard (``run = client.run(functions)``, one
``run.update(batch)`` per batch); then one call merges the ranks::

    import torch.distributed as dist
    from lossd.client import Client
    from lossd.client.distributed import merge_run

    dist.init_process_group("gloo")  # or nccl: only a few bytes per function travel
    with Client("lossd:50051") as client:
        run = client.run(["cross_entropy", "ece:n_bins=15"])
        for batch in my_shard:
            run.update(batch)
        result = merge_run(run)  # rank 0: the global values; other ranks: None

The ranks' states (protobuf ``State`` bytes) are gathered to one rank, which
sends them in a single ``Finalize`` call: the server merges them with the
same code that merges batches, so the values are those of one process that
saw every batch (global numerators over global denominators, never a mean of
rank means). Shards may be uneven; a rank that saw no batch sends nothing.

Jobs that merge later, or elsewhere, write one state file per rank and
finalize them together; the format lives in :mod:`lossd.client.state_files`
(``save_states``, ``load_states``, ``finalize_files``, re-exported here).

torch is imported only by the functions that use ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lossd.client.client import Client
from lossd.client.diagnostics import Diagnostic, DiagnosticTuple, merge_final_diagnostics
from lossd.client.evaluation import EvaluationResult
from lossd.client.messages import TagsLike, tags_proto
from lossd.client.run import Run
from lossd.client.state_files import (
    STATE_FILE_MAGIC,
    STATE_FILE_VERSION,
    StateFileError,
    StatesSource,
    check_consistent,
    finalize_files,
    load_states,
    named_states_of,
    read_state_file,
    save_states,
)
from lossd.v1 import lossd_pb2 as pb

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "STATE_FILE_MAGIC",
    "STATE_FILE_VERSION",
    "MergeError",
    "StateFileError",
    "StatesSource",
    "check_consistent",
    "finalize_files",
    "gather_states",
    "load_states",
    "merge_run",
    "named_states_of",
    "read_state_file",
    "save_states",
]


class MergeError(RuntimeError):
    """Raised on the ranks that did not call Finalize when the merging rank failed (its error is in the message)."""


# -- torch.distributed -------------------------------------------------------------------------


def _dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError as exc:  # the client never requires torch
        raise RuntimeError(
            "merging across ranks needs torch (torch.distributed); install torch, or write state files with save_states()"
        ) from exc
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expected an initialized torch.distributed process group; call torch.distributed.init_process_group() first")
    return dist


def _group_ranks(dist: Any, group: ProcessGroup | None) -> list[int]:
    """Global ranks of the group's members, in group-rank order."""
    if group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def _check_dst(dst: int | None, ranks: Sequence[int]) -> None:
    if dst is None:
        return
    if isinstance(dst, bool) or not isinstance(dst, int) or dst not in ranks:
        raise ValueError(
            f"expected dst to be the global rank of a group member ({ranks[0]}..{ranks[-1]}) or None (every rank), got {dst!r}"
        )


def _gather(payload: Any, group: ProcessGroup | None, dst: int | None) -> list[Any] | None:
    """Every rank's ``payload`` in group-rank order: on ``dst`` only (None elsewhere), or on every rank (dst=None)."""
    dist = _dist()
    ranks = _group_ranks(dist, group)
    _check_dst(dst, ranks)
    out: list[Any] = [None] * len(ranks)
    if dst is None:
        dist.all_gather_object(out, payload, group=group)
        return out
    me = dist.get_rank()
    dist.gather_object(payload, out if me == dst else None, dst=dst, group=group)
    return out if me == dst else None


def _decode_states(payloads: Sequence[bytes]) -> list[list[pb.NamedState]]:
    return [list(pb.FinalizeRequest.FromString(p).states) for p in payloads]


def gather_states(states: StatesSource, *, group: ProcessGroup | None = None, dst: int | None = 0) -> list[pb.NamedState] | None:
    """Every rank's states, checked for consistency, in rank order: on ``dst`` (a global rank), or on every rank (None).

    Ranks that are not ``dst`` get None. Pass the result to ``client.finalize``
    (or :func:`save_states`). Call it on every rank of ``group`` (default: the
    whole job); works with any backend (gloo on CPU included).
    """
    payload = pb.FinalizeRequest(states=named_states_of(states)).SerializeToString()
    gathered = _gather(payload, group, dst)
    if gathered is None:
        return None
    return check_consistent(_decode_states(gathered), [f"rank {i}" for i in range(len(gathered))])


def _diagnostics_of(run: Run) -> list[DiagnosticTuple]:
    if not run.batches:
        return []
    return [d.to_tuple() for d in run.diagnostics]


def _finalize_gathered(
    client: Client,
    gathered: Sequence[tuple[bytes, list[DiagnosticTuple]]],
    tags: pb.Tags | None,
    return_state: bool,
    timeout: float | None,
) -> EvaluationResult:
    states = check_consistent(_decode_states([g[0] for g in gathered]), [f"rank {i}" for i in range(len(gathered))])
    if not states:
        raise ValueError(f"expected at least one rank to have evaluated a batch, got none of {len(gathered)} ranks")
    result = client.finalize(states, tags=tags, return_state=return_state, timeout=timeout)
    ranks = [Diagnostic(*d) for g in gathered for d in g[1]]
    return EvaluationResult(result.response, merge_final_diagnostics(ranks, result.diagnostics))


def merge_run(
    run: Run,
    *,
    client: Client | None = None,
    group: ProcessGroup | None = None,
    dst: int | None = 0,
    tags: TagsLike = None,
    return_state: bool = False,
    timeout: float | None = None,
) -> EvaluationResult | None:
    """Merge every rank's run with one Finalize call on the server, sending all ranks' states.

    Call on every rank of ``group`` (default: the whole job). ``dst``: the
    global rank that gets the result (others get None), or None for every
    rank (one rank still calls Finalize, then broadcasts the response).
    ``client`` defaults to ``run.client``; ``tags`` to the run's tags. The
    result carries every rank's diagnostics, counts added up. Ranks that ran
    different functions (or parameters) get a ``ValueError`` naming them;
    when every rank gets the result and the Finalize call fails, the other
    ranks raise :class:`MergeError` with its message.
    """
    if not isinstance(run, Run):
        raise TypeError(
            f"expected a lossd.client.Run (for an AsyncRun, use gather_states() and await client.finalize()), got {type(run).__name__}"
        )
    chosen = run.client if client is None else client
    if not isinstance(chosen, Client):
        raise TypeError(f"expected a lossd.client.Client, got {type(chosen).__name__}")
    client = chosen
    tags_msg = tags_proto(tags) if tags is not None else run.tags
    payload = (pb.FinalizeRequest(states=named_states_of(run)).SerializeToString(), _diagnostics_of(run))
    if dst is not None:
        gathered = _gather(payload, group, dst)
        return None if gathered is None else _finalize_gathered(client, gathered, tags_msg, return_state, timeout)

    dist = _dist()
    root = _group_ranks(dist, group)[0]
    gathered = _gather(payload, group, None)
    assert gathered is not None
    # Every rank checks the states itself, so that mismatched ranks raise the same ValueError everywhere.
    check_consistent(_decode_states([g[0] for g in gathered]), [f"rank {i}" for i in range(len(gathered))])
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == root:
        try:
            result = _finalize_gathered(client, gathered, tags_msg, return_state, timeout)
            diagnostics = [d.to_tuple() for d in result.diagnostics]
            outcome[0] = ("ok", result.response.SerializeToString(), diagnostics)
        except Exception as exc:  # every rank must hear how it ended, or the others wait forever
            error = exc
            outcome[0] = ("error", f"{type(exc).__name__}: {exc}", [])
    dist.broadcast_object_list(outcome, src=root, group=group)
    if error is not None:
        raise error
    status, body, diagnostics = outcome[0]
    if status != "ok":
        raise MergeError(f"the merge on rank {root} failed: {body}")
    return EvaluationResult(pb.EvaluateResponse.FromString(body), [Diagnostic(*d) for d in diagnostics])
