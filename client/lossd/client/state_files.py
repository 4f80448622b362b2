r"""State files: the states of a run (or rank, or shard) on disk, to merge later or elsewhere.

    save_states(f"states/rank{rank}.lossd", run)
    ...
    result = finalize_files("lossd:50051", sorted(glob("states/*.lossd")))   # or: lossd finalize FILE...

A state file is ``LOSSD-STATES 1\n`` followed by a serialized
``lossd.v1.FinalizeRequest`` (the states by alias, and the run's tags). The
states checks here (same functions, parameters and state versions in every
source) are also those of :mod:`lossd.client.distributed`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from google.protobuf.message import DecodeError

from lossd.client.client import Client
from lossd.client.evaluation import EvaluationResult
from lossd.client.messages import TagsLike, tags_proto
from lossd.client.run import AsyncRun, Run
from lossd.v1 import lossd_pb2 as pb

__all__ = [
    "STATE_FILE_MAGIC",
    "STATE_FILE_VERSION",
    "StateFileError",
    "StatesSource",
    "named_states_of",
    "check_consistent",
    "save_states",
    "read_state_file",
    "load_states",
    "finalize_files",
]

STATE_FILE_MAGIC = b"LOSSD-STATES"
STATE_FILE_VERSION = 1

# What holds states: a run, {alias: State}, or NamedStates / (alias, State) pairs.
StatesSource: TypeAlias = Run | AsyncRun | Mapping[str, pb.State] | Iterable[pb.NamedState | tuple[str, pb.State]]


class StateFileError(ValueError):
    """A file that is not a lossd state file, or one of a version this client cannot read."""


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
        request: pb.FinalizeRequest = pb.FinalizeRequest.FromString(body)
    except DecodeError as exc:
        raise StateFileError(f"{path}: the states do not parse ({exc}); the file is truncated or corrupt") from exc
    return request


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
    address: str | Client,
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    tags: TagsLike = None,
    return_state: bool = False,
    timeout: float | None = None,
) -> EvaluationResult:
    """Merge the states of state files with one Finalize call on the server at ``address`` (or through a Client).

    A client given is used as it is (its TLS and token included) and left open;
    for an address, a client is opened with the environment's settings.

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
    if isinstance(address, Client):
        return address.finalize(states, tags=tags_msg, return_state=return_state, timeout=timeout)
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    with Client(address, **options) as client:
        return client.finalize(states, tags=tags_msg, return_state=return_state)
