"""Bearer tokens from a file, compared in constant time; refusals counted by reason, never by token.

The file holds one token per line, ``TOKEN`` or ``NAME:TOKEN``; blank lines
and lines starting with ``#`` are skipped. The name (``line-N`` when absent) is
the caller that logs and monitoring see; the token itself is kept only as its
SHA-256 digest. The file is read at start, re-read when it changes (checked at
most once a second) and on :meth:`TokenStore.reload` (``SIGHUP`` in ``lossd serve``);
a file that fails to parse on reload leaves the previous tokens in force.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from lossd.server.security.watch import FileSignature, signature
from lossd.server.settings import Settings

__all__ = ["Authenticator", "Unauthenticated", "TokenStore", "parse_tokens", "current_caller", "REASONS"]

log = logging.getLogger("lossd.security")

REASONS = ("missing", "malformed", "unknown_token")
CHECK_INTERVAL_SECONDS = 1.0

_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("lossd_caller", default=None)


def current_caller() -> str | None:
    """The token name of the call being handled (None without tokens or outside a call)."""
    return _caller.get()


class Unauthenticated(Exception):
    """A call without a valid bearer token; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str) -> list[tuple[str, bytes]]:
    """``(name, sha256(token))`` per token line of ``text``; errors name ``source`` and the line, never the token."""
    tokens: list[tuple[str, bytes]] = []
    names: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = f"line-{lineno}", line
        name, token = name.strip(), token.strip()
        if not name or not token or any(c.isspace() for c in token):
            raise ValueError(f"{source} line {lineno}: expected TOKEN or NAME:TOKEN without spaces in the token")
        if name in names:
            raise ValueError(f"{source} line {lineno}: token name {name!r} appears twice")
        names.add(name)
        tokens.append((name, _digest(token)))
    if not tokens:
        raise ValueError(f"{source}: expected at least one token, got none")
    return tokens


class TokenStore:
    """The tokens of one file, reloaded when it changes."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens, self._signature = self._read()  # an unreadable or empty file refuses to start
        self._checked = clock()

    def _read(self) -> tuple[list[tuple[str, bytes]], FileSignature]:
        sig = signature([self.path])
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read auth_tokens_file {self.path}: {exc.strerror}") from exc
        return parse_tokens(text, f"auth_tokens_file {self.path}"), sig

    def reload(self) -> bool:
        """Re-read the file now; True when the new tokens are in force, False when it failed (old ones kept)."""
        with self._lock:
            self._checked = self._clock()
            try:
                self._tokens, self._signature = self._read()
            except ValueError as exc:
                log.error("keeping the previous %d tokens: %s", len(self._tokens), exc)
                return False
            log.info("loaded %d tokens from %s", len(self._tokens), self.path)
            return True

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked < CHECK_INTERVAL_SECONDS:
            return
        self._checked = now
        if signature([self.path]) != self._signature:
            self.reload()

    def match(self, token: str) -> str | None:
        """The name of ``token``, or None; every token is compared (no early exit), each in constant time."""
        self._refresh()
        candidate = _digest(token)
        found: str | None = None
        for name, digest in self._tokens:
            if hmac.compare_digest(digest, candidate) and found is None:
                found = name
        return found


class Authenticator:
    """Checks ``Authorization`` values against a :class:`TokenStore` and counts refusals."""

    def __init__(self, store: TokenStore, registry: CollectorRegistry) -> None:
        self.store = store
        self.refused = Counter(
            "lossd_auth_refused",
            "Calls refused for a missing, malformed or unknown bearer token.",
            ["transport", "reason"],
            registry=registry,
        )
        for transport in ("grpc", "http"):
            for reason in REASONS:
                self.refused.labels(transport, reason)

    @classmethod
    def from_settings(cls, settings: Settings, registry: CollectorRegistry) -> Authenticator | None:
        """The authenticator of ``settings.auth_tokens_file`` (None without one); ValueError for a bad file."""
        if settings.auth_tokens_file is None:
            return None
        return cls(TokenStore(settings.auth_tokens_file), registry)

    def authenticate(self, values: Iterable[str], transport: str) -> str:
        """The caller's name for the ``authorization`` values of one call; raises :class:`Unauthenticated`."""
        try:
            name = self._check(list(values))
        except Unauthenticated as exc:
            self.refused.labels(transport, exc.reason).inc()
            raise
        _caller.set(name)
        return name

    def _check(self, values: list[str]) -> str:
        if not values:
            raise Unauthenticated("missing", "expected an 'authorization: Bearer <token>' header, got none")
        if len(values) > 1:
            raise Unauthenticated("malformed", f"expected one authorization header, got {len(values)}")
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed", "expected 'authorization: Bearer <token>'")
        name = self.store.match(token.strip())
        if name is None:
            raise Unauthenticated("unknown_token", "the bearer token is not one of the server's tokens")
        return name
