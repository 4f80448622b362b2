"""The validated function specs of recent requests: a client repeating its ``functions`` list has them parsed once.

Every Evaluate (and a stream's first message) names its functions as
FunctionSpec messages whose params are a google.protobuf.Struct. Turning the
Struct into Python values (:func:`lossd.server.convert.specs_from_request`)
and checking them against the declarations (:func:`lossd.kernels.evaluate.prepare`)
is a fixed cost per request that, for a [64, 10] batch, is a tenth of the
handler's own work, and a client nearly always sends the same list.
:class:`SpecCache` keeps the :class:`~lossd.kernels.evaluate.PreparedSpecs`
of the lists it saw last, keyed by their deterministic serialization (equal
bytes are equal messages, hence equal specs); PreparedSpecs are immutable, so
one serves every request that names the same list.

Only lists that validate are kept. For one that does not, :meth:`SpecCache.prepared`
answers None and :meth:`SpecCache.specs` takes the uncached path, which refuses
it with exactly the errors, in exactly the order, it always had. Memory is bounded:
at most ``max_entries`` lists of at most ``max_key_bytes`` serialized bytes each
(a longer list is validated on every request, as before).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from lossd.kernels.errors import InvalidInput
from lossd.kernels.evaluate import FunctionSpec, PreparedSpecs, prepare
from lossd.server.convert import specs_from_request
from lossd.v1 import lossd_pb2 as pb

__all__ = ["SpecCache", "MAX_ENTRIES", "MAX_KEY_BYTES"]

MAX_ENTRIES = 256
MAX_KEY_BYTES = 4096


class SpecCache:
    """A bounded LRU of validated ``functions`` lists, shared by the event loop and the compute threads."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_key_bytes: int = MAX_KEY_BYTES) -> None:
        if max_entries < 0 or max_key_bytes < 0:
            raise ValueError(f"max_entries and max_key_bytes: expected >= 0, got {max_entries} and {max_key_bytes}")
        self.max_entries = max_entries
        self.max_key_bytes = max_key_bytes
        self._entries: OrderedDict[tuple[bytes, ...], PreparedSpecs] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def prepared(self, functions: Sequence[pb.FunctionSpec]) -> PreparedSpecs | None:
        """``functions`` validated (from the cache when seen before), or None when they do not validate.

        None asks the caller to parse them the uncached way, which raises
        their errors where it always did; anything but InvalidInput (a bug)
        propagates from here."""
        key = tuple(f.SerializeToString(deterministic=True) for f in functions)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        try:
            specs = prepare(specs_from_request(list(functions)))
        except InvalidInput:
            return None
        if self.max_entries and sum(len(part) for part in key) <= self.max_key_bytes:
            with self._lock:
                self._entries[key] = specs
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return specs

    def specs(self, functions: Sequence[pb.FunctionSpec], prepared: PreparedSpecs | None = None) -> PreparedSpecs | list[FunctionSpec]:
        """``functions`` for lossd.kernels: ``prepared`` or the cached PreparedSpecs, else parsed the uncached way.

        The uncached way raises what it always raised, where it always did:
        :func:`~lossd.server.convert.specs_from_request`'s errors here,
        :func:`~lossd.kernels.evaluate.prepare`'s where evaluate or the
        Accumulator prepares the specs (after the tensors are decoded)."""
        found = prepared if prepared is not None else self.prepared(functions)
        return found if found is not None else specs_from_request(list(functions))
