"""Container health check: asks the server's own gRPC health service (grpc.health.v1).

Exit 0 when the overall status is SERVING, 1 otherwise. It speaks the transport the server
speaks: plaintext without LOSSD_TLS_CERT_FILE; TLS with it, trusting LOSSD_HEALTHCHECK_CA_FILE
(the CA that signed the server certificate, default /certs/ca.pem) and, when the server asks
for client certificates (LOSSD_TLS_CLIENT_CA_FILE), presenting LOSSD_HEALTHCHECK_CLIENT_CERT_FILE
/ LOSSD_HEALTHCHECK_CLIENT_KEY_FILE. The certificate must name LOSSD_HEALTHCHECK_SERVER_NAME
(default localhost), whatever address is dialled. The health service needs no token.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(target: str) -> grpc.Channel:
    if not os.environ.get("LOSSD_TLS_CERT_FILE"):
        return grpc.insecure_channel(target)
    ca = Path(os.environ.get("LOSSD_HEALTHCHECK_CA_FILE", "/certs/ca.pem")).read_bytes()
    cert_file, key_file = os.environ.get("LOSSD_HEALTHCHECK_CLIENT_CERT_FILE"), os.environ.get("LOSSD_HEALTHCHECK_CLIENT_KEY_FILE")
    pair = (Path(key_file).read_bytes(), Path(cert_file).read_bytes()) if cert_file and key_file else (None, None)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=pair[0], certificate_chain=pair[1])
    # The probe dials the loopback address; the certificate names the service (or localhost,
    # as scripts/gen_certs.py writes it), so the name checked is set apart from the address.
    server_name = os.environ.get("LOSSD_HEALTHCHECK_SERVER_NAME", "localhost")
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", server_name)])


def main() -> int:
    """Probe the local server once; the exit status is the verdict."""
    target = f"127.0.0.1:{os.environ.get('LOSSD_GRPC_PORT', '50051')}"
    try:
        with _channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
    except (grpc.RpcError, OSError) as exc:
        print(f"lossd health check on {target} failed: {exc}", file=sys.stderr)
        return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"lossd on {target} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
