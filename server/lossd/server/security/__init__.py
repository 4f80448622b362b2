"""Security of a lossd process: TLS and its rotation, bearer tokens, the bind policy.

- :mod:`~lossd.server.security.policy`: which binds are allowed without TLS and tokens;
- :mod:`~lossd.server.security.tls`: certificates for gRPC and HTTPS, reloaded when they change;
- :mod:`~lossd.server.security.tokens`: the token file, constant-time checks, the refusal counter;
- :mod:`~lossd.server.security.grpc_auth`: the gRPC interceptor enforcing tokens.

The gateway's HTTP side is :mod:`lossd.server.gateway.security`.
"""

from lossd.server.security.grpc_auth import OPEN_GRPC_PREFIXES, WWW_AUTHENTICATE, AuthInterceptor
from lossd.server.security.policy import InsecureBindError, check_bind, is_loopback, reflection_enabled, tls_configured
from lossd.server.security.tls import HttpsReloader, TlsFiles, grpc_server_credentials
from lossd.server.security.tokens import REASONS, Authenticator, TokenStore, Unauthenticated, current_caller, parse_tokens

__all__ = [
    "OPEN_GRPC_PREFIXES",
    "REASONS",
    "WWW_AUTHENTICATE",
    "AuthInterceptor",
    "Authenticator",
    "HttpsReloader",
    "InsecureBindError",
    "TlsFiles",
    "TokenStore",
    "Unauthenticated",
    "check_bind",
    "current_caller",
    "grpc_server_credentials",
    "is_loopback",
    "parse_tokens",
    "reflection_enabled",
    "tls_configured",
]
