"""TLS on both ports from PEM files, with certificate rotation while serving.

gRPC: ``grpc.dynamic_ssl_server_credentials`` asks :meth:`TlsFiles.grpc_config_if_changed`
on every new connection's handshake, which re-reads the files when their
inode, size or mtime changed: a rotated certificate is served to the next
connection, and established connections keep theirs. HTTPS: uvicorn builds one
``ssl.SSLContext``; :meth:`HttpsReloader.reload_if_changed` loads the new chain
into that same context (``lossd serve`` calls it every few seconds and on
SIGHUP), which new connections use. A CA bundle only grows in a live context
(OpenSSL cannot drop a trusted CA): removing a client CA needs a restart.
Files that fail to load on rotation are logged and the previous ones kept.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from lossd.server.security.watch import FileSignature, signature
from lossd.server.settings import Settings

__all__ = ["TlsFiles", "HttpsReloader", "grpc_server_credentials"]

log = logging.getLogger("lossd.security")


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of the server's certificate chain, its key and (mutual TLS) the client CA bundle."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles | None:
        """The files ``settings`` name, or None when TLS is off."""
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        return cls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)

    def paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca is not None else [])

    def signature(self) -> FileSignature:
        return signature(self.paths())

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, key, client CA) as PEM bytes, checked by loading them; ValueError names the bad file."""
        blobs: list[bytes] = []
        for setting, path in (("tls_cert_file", self.cert), ("tls_key_file", self.key), ("tls_client_ca_file", self.client_ca)):
            if path is None:
                continue
            try:
                blobs.append(path.read_bytes())
            except OSError as exc:
                raise ValueError(f"cannot read {setting} {path}: {exc.strerror}") from exc
        self.server_context()  # the same checks OpenSSL makes at a handshake, made now
        return blobs[0], blobs[1], blobs[2] if self.client_ca is not None else None

    def server_context(self) -> ssl.SSLContext:
        """A server SSLContext with these files loaded; ValueError when OpenSSL rejects one."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.load_into(context)
        return context

    def load_into(self, context: ssl.SSLContext) -> None:
        """Load the chain (and client CA) into ``context``; ValueError when OpenSSL rejects one."""
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"tls_cert_file {self.cert} / tls_key_file {self.key}: not a matching PEM certificate and key ({exc})"
            ) from exc
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(f"tls_client_ca_file {self.client_ca}: not a PEM CA bundle ({exc})") from exc

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments of ``uvicorn.Config`` serving HTTPS with these files."""
        options: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            options |= {"ssl_ca_certs": str(self.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that re-read ``files`` when they change (client certificates required with a client CA)."""
    cert, key, client_ca = files.read()
    last = files.signature()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal last
        current = files.signature()
        if current == last:
            return None  # keep serving the configuration in force
        last = current
        try:
            cert, key, client_ca = files.read()
        except ValueError as exc:
            log.error("gRPC keeps its previous certificate: %s", exc)
            return None
        log.info("gRPC serves the rotated certificate %s", files.cert)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)
    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=client_ca is not None)


class HttpsReloader:
    """Loads rotated files into uvicorn's live SSLContext."""

    def __init__(self, files: TlsFiles, context: ssl.SSLContext) -> None:
        self.files = files
        self.context = context
        self._signature = files.signature()

    def reload_if_changed(self, *, force: bool = False) -> bool:
        """Reload when the files changed (or ``force``); True when new files are in force."""
        current = self.files.signature()
        if current == self._signature and not force:
            return False
        self._signature = current
        try:
            self.files.server_context()  # check first: a half-written file must not break the live context
            self.files.load_into(self.context)
        except ValueError as exc:
            log.error("HTTPS keeps its previous certificate: %s", exc)
            return False
        log.info("HTTPS serves the rotated certificate %s", self.files.cert)
        return True
