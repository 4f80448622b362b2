"""Where and how a client connects: address, TLS files and bearer token, as one value object.

    LOSSD_SERVER            the server's gRPC address HOST:PORT (default 127.0.0.1:50051)
    LOSSD_TLS               "true": TLS with the system's root certificates
    LOSSD_TLS_CA_FILE       PEM roots that sign the server's certificate (implies TLS)
    LOSSD_TLS_CLIENT_CERT_FILE, LOSSD_TLS_CLIENT_KEY_FILE
                            PEM client certificate and key, for servers that require mutual TLS
    LOSSD_TOKEN             bearer token sent as ``authorization: Bearer <token>`` on every call
    LOSSD_TOKEN_FILE        a file holding the token (read when a channel opens)
    LOSSD_REUSE_LARGE_BUFFERS
                            "false": leave glibc's malloc thresholds alone (process-wide,
                            read when a client opens; :mod:`lossd.client.buffers`)

:meth:`ClientSettings.from_environment` is the only place the client reads
these variables, so a job sets them once and every ``Client``,
``AsyncClient`` and ``lossd eval``/``finalize``/``functions`` follows.
Arguments given in code or on the command line win over the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_ADDRESS", "ENVIRONMENT", "ClientSettings", "configured_address", "is_loopback", "reuse_large_buffers_enabled"]

DEFAULT_ADDRESS = "127.0.0.1:50051"

# Setting name -> environment variable.
ENVIRONMENT: dict[str, str] = {
    "address": "LOSSD_SERVER",
    "tls": "LOSSD_TLS",
    "ca_file": "LOSSD_TLS_CA_FILE",
    "cert_file": "LOSSD_TLS_CLIENT_CERT_FILE",
    "key_file": "LOSSD_TLS_CLIENT_KEY_FILE",
    "token": "LOSSD_TOKEN",
    "token_file": "LOSSD_TOKEN_FILE",
}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _flag(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{name}: expected true or false, got {text!r}")
    return value in _TRUE


def configured_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The address in ``LOSSD_SERVER``, or None when it is not set."""
    text = (os.environ if environ is None else environ).get(ENVIRONMENT["address"], "").strip()
    return text or None


def reuse_large_buffers_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """``LOSSD_REUSE_LARGE_BUFFERS`` (default true): whether clients keep large freed buffers for reuse."""
    text = (os.environ if environ is None else environ).get("LOSSD_REUSE_LARGE_BUFFERS", "")
    return True if not text.strip() else _flag("LOSSD_REUSE_LARGE_BUFFERS", text)


def is_loopback(address: str) -> bool:
    """Whether ``address`` (HOST:PORT, [V6]:PORT or unix:PATH) names this machine only."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ClientSettings:
    """A client's connection settings; ``from_environment()`` reads ``LOSSD_*``, ``override()`` applies arguments.

    TLS is on when ``tls`` is true or any certificate file is given. The
    token is never shown by ``repr``; a token without TLS is refused unless
    the server is on this machine (a bearer token must not cross a network
    in clear text).
    """

    address: str = DEFAULT_ADDRESS
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not self.address:
            raise ValueError(f"expected a server address host:port, got {self.address!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("expected both cert_file and key_file (a client certificate and its key), or neither")
        if self.token is not None and self.token_file is not None:
            raise ValueError("expected token or token_file, got both")
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise ValueError("expected token to be a non-empty string")
        if (self.token is not None or self.token_file is not None) and not self.secure and not is_loopback(self.address):
            raise ValueError(f"a bearer token needs TLS to reach {self.address}: pass tls=True or ca_file= (--tls-ca, LOSSD_TLS_CA_FILE)")

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS."""
        return self.tls or self.ca_file is not None or self.cert_file is not None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ClientSettings:
        """Return the settings of the ``LOSSD_*`` variables (unset ones keep their defaults), ``overrides`` applied.

        The overrides are those of :meth:`override`, applied before the
        settings are checked (so an argument can fix what the environment
        alone would refuse).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in ENVIRONMENT.items():
            text = env.get(variable)
            if text is None or text == "":
                continue
            if name == "tls":
                values[name] = _flag(variable, text)
            elif name in ("address", "token"):
                values[name] = text.strip()
            else:
                values[name] = Path(text)
        values.update(_changes(**overrides))
        return cls(**values)

    def override(
        self,
        *,
        address: str | None = None,
        tls: bool | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
    ) -> ClientSettings:
        """Return these settings with every argument that is not None applied.

        A token replaces a token file and the reverse; ``tls=False`` turns
        TLS off together with the certificate files.
        """
        changes = _changes(
            address=address, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file, token=token, token_file=token_file
        )
        return dataclasses.replace(self, **changes)

    def bearer_token(self) -> str | None:
        """The token to send: ``token``, or the first line of ``token_file``; None for none."""
        if self.token is not None:
            return self.token.strip()
        if self.token_file is None:
            return None
        try:
            text = self.token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"token_file: cannot read {self.token_file}: {exc.strerror or exc}") from exc
        if not text:
            raise ValueError(f"token_file: expected a token in {self.token_file}, got an empty file")
        return text.splitlines()[0].strip()

    def read_pem(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """The PEM bytes of (roots, client key, client certificate chain); None where not set."""
        return tuple(self._read(name) for name in ("ca_file", "key_file", "cert_file"))  # type: ignore[return-value]

    def _read(self, name: str) -> bytes | None:
        path: Path | None = getattr(self, name)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{name}: cannot read {path}: {exc.strerror or exc}") from exc


def _changes(
    *,
    address: str | None = None,
    tls: bool | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The fields that arguments given (not None) set; see :meth:`ClientSettings.override`."""
    changes: dict[str, Any] = {}
    if address is not None:
        changes["address"] = address
    if tls is not None:
        changes["tls"] = tls
        if not tls:
            changes.update(ca_file=None, cert_file=None, key_file=None)
    for name, value in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if value is not None:
            changes[name] = Path(value)
    if token is not None:
        changes.update(token=token, token_file=None)
    if token_file is not None:
        changes.update(token_file=Path(token_file), token=None)
    return changes
