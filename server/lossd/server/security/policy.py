"""What a bind may be: loopback is open by default; any other address needs TLS and tokens (or mutual TLS).

``check_bind(settings)`` raises :class:`InsecureBindError` with one line that
names the way out (``LOSSD_ALLOW_INSECURE=true``); ``lossd serve`` prints it and
exits 2 before binding anything.
"""

from __future__ import annotations

import ipaddress

from lossd.server.settings import Settings

__all__ = ["InsecureBindError", "check_bind", "is_loopback", "reflection_enabled", "tls_configured"]


class InsecureBindError(ValueError):
    """A non-loopback bind without TLS and authentication, and ``allow_insecure`` not set."""


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1; a hostname or a wildcard address is not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tls_configured(settings: Settings) -> bool:
    """Whether both TLS files are set (one without the other is refused by :func:`check_bind`)."""
    return settings.tls_cert_file is not None and settings.tls_key_file is not None


def check_bind(settings: Settings) -> None:
    """Refuse half-configured TLS and an open non-loopback bind; see the module docstring."""
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise InsecureBindError("expected both tls_cert_file and tls_key_file (LOSSD_TLS_CERT_FILE, LOSSD_TLS_KEY_FILE), got one")
    if settings.tls_client_ca_file is not None and not tls_configured(settings):
        raise InsecureBindError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file too")
    if is_loopback(settings.host) or settings.allow_insecure:
        return
    authenticated = settings.auth_tokens_file is not None or settings.tls_client_ca_file is not None
    if tls_configured(settings) and authenticated:
        return
    missing = " and ".join(
        what
        for what, ok in (
            ("TLS (LOSSD_TLS_CERT_FILE/LOSSD_TLS_KEY_FILE)", tls_configured(settings)),
            ("tokens (LOSSD_AUTH_TOKENS_FILE) or mutual TLS", authenticated),
        )
        if not ok
    )
    raise InsecureBindError(
        f"refusing to bind {settings.host} without {missing}: anyone who can reach it could call it; "
        "configure them, bind 127.0.0.1, or set LOSSD_ALLOW_INSECURE=true to serve it open anyway"
    )


def reflection_enabled(settings: Settings) -> bool:
    """gRPC reflection: as set, else on for a loopback bind and off for any other."""
    return settings.reflection if settings.reflection is not None else is_loopback(settings.host)
