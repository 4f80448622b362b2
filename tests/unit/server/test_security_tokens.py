"""Token file parsing, constant-time matching, the refusal counter and the bind policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lossd.server.security import (
    Authenticator,
    InsecureBindError,
    TokenStore,
    Unauthenticated,
    check_bind,
    is_loopback,
    parse_tokens,
    reflection_enabled,
)
from lossd.server.settings import Settings


def test_parse_tokens_names_comments_and_errors() -> None:
    tokens = parse_tokens("# team tokens\n\nci:abc123\n  plain-token  \n", "f")
    assert [name for name, _ in tokens] == ["ci", "line-4"]
    with pytest.raises(ValueError, match=r"f line 1: expected TOKEN or NAME:TOKEN"):
        parse_tokens("ci:has space\n", "f")
    with pytest.raises(ValueError, match="appears twice"):
        parse_tokens("a:x\na:y\n", "f")
    with pytest.raises(ValueError, match="at least one token"):
        parse_tokens("# none\n", "f")


def test_authenticator_reasons_reload_and_counter(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("ci:secret-one\nbob:secret-two\n")
    now = [0.0]
    registry = CollectorRegistry()
    auth = Authenticator(TokenStore(path, clock=lambda: now[0]), registry)
    assert auth.authenticate(["Bearer secret-two"], "grpc") == "bob"
    for values, reason in (([], "missing"), (["Basic x"], "malformed"), (["Bearer"], "malformed"), (["Bearer nope"], "unknown_token")):
        with pytest.raises(Unauthenticated) as info:
            auth.authenticate(values, "http")
        assert info.value.reason == reason
    assert registry.get_sample_value("lossd_auth_refused_total", {"transport": "http", "reason": "malformed"}) == 2
    path.write_text("ci:secret-one\n")
    now[0] = 2.0  # past the check interval: the changed file is read again
    with pytest.raises(Unauthenticated):
        auth.authenticate(["Bearer secret-two"], "grpc")
    path.write_text("broken line with spaces\n")
    assert auth.store.reload() is False  # a bad file keeps the tokens in force
    assert auth.authenticate(["bearer secret-one"], "grpc") == "ci"


def test_bind_policy() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    check_bind(Settings())
    with pytest.raises(InsecureBindError, match="LOSSD_ALLOW_INSECURE=true"):
        check_bind(Settings(host="0.0.0.0"))
    with pytest.raises(InsecureBindError, match="tokens"):
        check_bind(Settings(host="0.0.0.0", tls_cert_file=Path("c"), tls_key_file=Path("k")))
    with pytest.raises(InsecureBindError, match="both tls_cert_file and tls_key_file"):
        check_bind(Settings(tls_cert_file=Path("c")))
    check_bind(Settings(host="0.0.0.0", allow_insecure=True))
    check_bind(Settings(host="0.0.0.0", tls_cert_file=Path("c"), tls_key_file=Path("k"), tls_client_ca_file=Path("ca")))
    assert reflection_enabled(Settings()) and not reflection_enabled(Settings(host="0.0.0.0"))
    assert reflection_enabled(Settings(host="0.0.0.0", reflection=True))
