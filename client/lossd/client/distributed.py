r"""Exact totals across the ranks of a distributed job, or across state files merged elsewhere.

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
finalize them together (``lossd finalize --server HOST:PORT FILE...``)::

    save_states(f"states/rank{rank}.lossd", run)
    ...
    result = finalize_files("lossd:50051", sorted(glob("states/*.lossd")))

A state file is ``LOSSD-STATES 1\\n`` followed by a serialized
``lossd.v1.FinalizeRequest`` (the states by alias, and the run's tags).

torch is imported only by the functions that use ``torch.distributed``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from google.protobuf.message import DecodeError

from lossd.client.client import Client
from lossd.client.evaluation import Diagnostic, EvaluationResult, merge_diagnostics
from lossd.client.messages import TagsLike, tags_proto
from lossd.client.run import AsyncRun, Run
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
    "read_state_file",
    "save_states",
]

STATE_FILE_MAGIC = b"LOSSD-STATES"
STATE_FILE_VERSION = 1

# What holds states: a run, {alias: State}, or NamedStates / (alias, State) pairs.
StatesSource: TypeAlias = Run | AsyncRun | Mapping[str, pb.State] | Iterable[pb.NamedState | tuple[str, pb.State]]

# A diagnostic as plain values, for the object collectives: (code, severity, message, function, count).
_DiagnosticTuple = tuple[str, str, str, str, int]


class MergeError(RuntimeError):
    """Raised on the ranks that did not call Finalize when the merging rank failed (its error is in the message)."""


class StateFileError(ValueError):
    """A file that is not a lossd state file, or one of a version this client cannot read."""


# -- states of a run ---------------------------------------------------------------------------


def named_states_of(source: StatesSource) -> list[pb.NamedState]:
    """Return the states of a run (``run.states()``), a mapping or pairs as NamedStates; empty is allowed."""
    if isinstance(source, (Run, AsyncRun)):
        source = source.states()
    items: Iterable[Any] = source.items() if isinstance(source, Mapping) else source
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"expected a Run, {{alias: State}} or NamedStates, got {type(source).__name__}")
    out: list[pb.NamedState] = []
    for item in items:
        if isinstance(item, pb.NamedState):
            alias, state = item.alias, item.state
        elif isinstance(item, tuple) and len(item) == 2:
            alias, state = item
        else:
            raise TypeError(f"expected NamedStates or (alias, State) pairs, got {type(item).__name__}")
        if not isinstance(alias, str) or not alias or not isinstance(state, pb.State):
            raise TypeError(f"expected a non-empty alias (str) and a lossd.v1.State, got {alias!r} and {type(state).__name__}")
        out.append(pb.NamedState(alias=alias, state=state))
    return out


def _identity(state: pb.State) -> str:
    return f"{state.function} v{state.version} with params {state.params_json or '{}'}"


def check_consistent(sources: Sequence[Sequence[pb.NamedState]], labels: Sequence[str]) -> list[pb.NamedState]:
    """Return the states of every source (rank, file) in source order, checked to come from the same functions.

    A source without states (a rank that saw no batch) contributes nothing.
    Every other source must hold one state per alias, the same aliases, each
    of the same function, state version and parameters as in the others.
    """
    if len(sources) != len(labels):
        raise ValueError(f"expected one label per source, got {len(labels)} labels for {len(sources)} sources")
    first: dict[str, tuple[str, str]] = {}  # alias -> (identity, label of the first source that has it)
    reference: tuple[str, frozenset[str]] | None = None  # (label, aliases) of the first source with states
    problems: list[str] = []
    for label, states in zip(labels, sources, strict=True):
        if not states:
            continue
        aliases = [s.alias for s in states]
        duplicates = sorted({a for a in aliases if aliases.count(a) > 1})
        if duplicates:
            problems.append(f"{label} holds several states for {duplicates}; merge them first (one state per alias and source)")
        if reference is None:
            reference = (label, frozenset(aliases))
        elif set(aliases) != reference[1]:
            missing, extra = sorted(reference[1] - set(aliases)), sorted(set(aliases) - reference[1])
            what = "; ".join(x for x in (f"lacks {missing}" if missing else "", f"has extra {extra}" if extra else "") if x)
            problems.append(f"{label} {what} compared with {reference[0]}")
        for s in states:
            identity = _identity(s.state)
            seen = first.setdefault(s.alias, (identity, label))
            if seen[0] != identity:
                problems.append(f"alias {s.alias!r}: {seen[1]} has {seen[0]}, but {label} has {identity}")
    if problems:
        raise ValueError("expected every rank or file to evaluate the same functions with the same parameters, got: " + "; ".join(problems))
    return [s for states in sources for s in states]


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


def _diagnostics_of(run: Run) -> list[_DiagnosticTuple]:
    if not run.batches:
        return []
    return [(d.code, d.severity, d.message, d.function, d.count) for d in run.result().diagnostics]


def _merged_diagnostics(ranks: Iterable[Diagnostic], final: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Merge the ranks' diagnostics (counts added up) with the Finalize call's; a finding both report counts once per batch."""
    merged = {(d.code, d.severity, d.function): d for d in merge_diagnostics(list(ranks))}
    for d in final:
        key = (d.code, d.severity, d.function)
        prior = merged.get(key)
        merged[key] = d if prior is None else replace(d, count=max(prior.count, d.count))
    return list(merged.values())


def _finalize_gathered(
    client: Client,
    gathered: Sequence[tuple[bytes, list[_DiagnosticTuple]]],
    tags: pb.Tags | None,
    return_state: bool,
    timeout: float | None,
) -> EvaluationResult:
    states = check_consistent(_decode_states([g[0] for g in gathered]), [f"rank {i}" for i in range(len(gathered))])
    if not states:
        raise ValueError(f"expected at least one rank to have evaluated a batch, got none of {len(gathered)} ranks")
    result = client.finalize(states, tags=tags, return_state=return_state, timeout=timeout)
    ranks = [Diagnostic(*d) for g in gathered for d in g[1]]
    return EvaluationResult(result.response, _merged_diagnostics(ranks, result.diagnostics))


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
    client = run.client if client is None else client
    if not isinstance(client, Client):
        raise TypeError(f"expected a lossd.client.Client, got {type(client).__name__}")
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
            diagnostics = [(d.code, d.severity, d.message, d.function, d.count) for d in result.diagnostics]
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


# -- state files -------------------------------------------------------------------------------


def _header(version: int) -> bytes:
    return STATE_FILE_MAGIC + b" " + str(version).encode() + b"\n"


def save_states(path: str | os.PathLike[str], states: StatesSource, *, tags: TagsLike = None) -> Path:
    """Write ``states`` (a run, ``{alias: State}`` or NamedStates) to a state file; returns its path.

    A run that saw no batch writes a file without states, so every rank can
    always write one. ``tags`` default to the run's. The file appears whole
    or not at all (written aside, then renamed).
    """
    path = Path(path)
    request = pb.FinalizeRequest(states=named_states_of(states))
    tags_msg = tags_proto(tags) if tags is not None else (states.tags if isinstance(states, (Run, AsyncRun)) else None)
    if tags_msg is not None:
        request.tags.CopyFrom(tags_msg)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # beside it: the rename stays on one filesystem
    try:
        with open(tmp, "xb") as f:
            f.write(_header(STATE_FILE_VERSION))
            f.write(request.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_state_file(path: str | os.PathLike[str]) -> pb.FinalizeRequest:
    """Read the states and tags of one state file (see the module docstring for the format)."""
    with open(path, "rb") as f:
        data = f.read()
    line, newline, body = data.partition(b"\n")
    magic, _, version = line.partition(b" ")
    if magic != STATE_FILE_MAGIC or not newline:
        raise StateFileError(f"{path}: expected a lossd state file (starting with {_header(STATE_FILE_VERSION)!r}), got {data[:16]!r}")
    if version != str(STATE_FILE_VERSION).encode():
        raise StateFileError(
            f"{path}: expected state file version {STATE_FILE_VERSION}, got {version.decode(errors='replace')!r}; use a newer lossd client"
        )
    try:
        return pb.FinalizeRequest.FromString(body)
    except DecodeError as exc:
        raise StateFileError(f"{path}: the states do not parse ({exc}); the file is truncated or corrupt") from exc


def _paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    out = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not out:
        raise ValueError("expected at least one state file, got none")
    return out


def load_states(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[pb.NamedState]:
    """Read the states of every file in file order, checked to come from the same functions (for ``client.finalize``)."""
    files = _paths(paths)
    return check_consistent([list(read_state_file(p).states) for p in files], [str(p) for p in files])


def finalize_files(
    address: str,
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    tags: TagsLike = None,
    return_state: bool = False,
    timeout: float | None = None,
) -> EvaluationResult:
    """Merge the states of state files with one Finalize call on the server at ``address``.

    ``tags`` default to those stored in the files (refused when files differ,
    so pass them explicitly then). ``result.to_json()`` is what
    ``lossd finalize --json`` prints.
    """
    files = _paths(paths)
    requests = [read_state_file(p) for p in files]
    states = check_consistent([list(r.states) for r in requests], [str(p) for p in files])
    if not states:
        raise ValueError(f"expected states in at least one file, got none in {[str(p) for p in files]} (every rank saw no batch)")
    tags_msg = tags_proto(tags)
    if tags_msg is None:
        stored = {r.tags.SerializeToString(deterministic=True): r.tags for r in requests if r.HasField("tags")}
        if len(stored) > 1:
            raise ValueError(f"expected the files to carry the same tags, got {len(stored)} different sets; pass tags= to choose")
        tags_msg = next(iter(stored.values()), None)
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    with Client(address, **options) as client:
        return client.finalize(states, tags=tags_msg, return_state=return_state)
