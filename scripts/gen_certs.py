"""Certificates and a token file for running lossd with TLS locally (docker compose, tests, a laptop).

    python scripts/gen_certs.py [--out deploy/certs] [--name HOST ...] [--days 30]

Writes into ``--out`` (git-ignored by default): ``ca.pem`` / ``ca-key.pem`` (a
fresh private CA), ``server.pem`` / ``server-key.pem`` (valid for localhost,
127.0.0.1, ::1, the compose service names and every ``--name``),
``client.pem`` / ``client-key.pem`` (a client certificate for mutual TLS) and
``tokens`` (``NAME:TOKEN`` lines for LOSSD_AUTH_TOKENS_FILE) with
``prometheus-token`` (the ``prometheus`` token alone, for Prometheus's
``credentials_file``). Keys and tokens
are readable by their owner only. For local use: a real deployment takes its
certificates from its own CA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_FOR_CONTAINER = False  # --for-container: keys readable by the container's user (uid 10001), not only their owner
# "lossd": the name nginx verifies every replica under (deploy/nginx/nginx.conf).
DEFAULT_NAMES = ["localhost", "127.0.0.1", "::1", "lossd", "lossd-1", "lossd-2", "nginx"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lossd local"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _write(path: Path, data: bytes, private: bool) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600 if private and not _FOR_CONTAINER else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], common_name: str, days: int, *, server_names: list[str] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names is not None else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server_names is not None:
        builder = builder.add_extension(_san(server_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def generate(out: Path, names: list[str], days: int) -> None:
    """Write a CA, a server and a client certificate and a token file into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("lossd local CA"))
        .issuer_name(_name("lossd local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "ca-key.pem", _key_pem(ca_key), private=True)
    for stem, common_name, server_names in (("server", "lossd server", names), ("client", "lossd client", None)):
        cert, key = _issue((ca_cert, ca_key), common_name, days, server_names=server_names)
        _write(out / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(out / f"{stem}-key.pem", _key_pem(key), private=True)
    scraper = secrets.token_urlsafe(32)  # Prometheus's own token (deploy/prometheus/prometheus.yml)
    tokens = f"# NAME:TOKEN per line, for LOSSD_AUTH_TOKENS_FILE\nlocal:{secrets.token_urlsafe(32)}\nprometheus:{scraper}\n"
    _write(out / "tokens", tokens.encode(), private=True)
    _write(out / "prometheus-token", f"{scraper}\n".encode(), private=True)


def main() -> None:
    """Parse the flags and write the files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "deploy" / "certs", help="output folder")
    parser.add_argument("--name", action="append", default=[], help="another DNS name or IP the server certificate is valid for")
    parser.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    parser.add_argument("--for-container", action="store_true", help="make keys and tokens readable by all (the compose stack)")
    args = parser.parse_args()
    global _FOR_CONTAINER
    _FOR_CONTAINER = args.for_container
    generate(args.out, DEFAULT_NAMES + args.name, args.days)
    print(f"wrote ca.pem, server.pem, client.pem (+ keys) and tokens to {args.out}")


if __name__ == "__main__":
    main()
