"""Client TLS, mutual TLS and bearer tokens against small real gRPC servers on port 0.

The servers here answer the LossService with fixed values and record the
``authorization`` metadata of every call; certificates come from the repo's
own ``scripts/gen_certs.py`` (the cryptography package), made per test module.
The full path through a lossd server is tested in tests/integration.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lossd.client import AsyncClient, Client, ClientSettings, UnavailableError
from lossd.client.core import channel_credentials
from lossd.client.settings import is_loopback
from lossd.client.state_files import finalize_files, save_states
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "s3cret-token"
VALUE = 0.25


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_certs.py"), "--out", str(out)], check=True, capture_output=True, timeout=60)
    return out


class Recorder(grpc.ServerInterceptor):
    """Keeps (method, authorization metadata or None) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        metadata = dict(details.invocation_metadata or ())
        with self.lock:
            self.calls.append((details.method.rsplit("/", 1)[-1], metadata.get("authorization")))
        return continuation(details)


def _response(request_id: str) -> pb.EvaluateResponse:
    return pb.EvaluateResponse(
        results=[pb.FunctionResult(alias="mse", function="mse", values={"value": VALUE}, state=pb.State(function="mse", version=1))],
        request_id=request_id,
        batches=1,
    )


class FixedService(pb_grpc.LossServiceServicer):
    """Answers every rpc with the same value (0.25) and a state, whatever the tensors."""

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:
        return _response(request.request_id)

    def EvaluateStream(self, requests: Iterator[pb.EvaluateRequest], context: grpc.ServicerContext) -> pb.EvaluateResponse:
        first = next(requests)
        for _ in requests:
            pass
        return _response(first.request_id)

    def Finalize(self, request: pb.FinalizeRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:
        return _response(request.request_id)

    def ListFunctions(self, request: pb.ListFunctionsRequest, context: grpc.ServicerContext) -> pb.ListFunctionsResponse:
        return pb.ListFunctionsResponse(functions=[pb.FunctionInfo(name="mse", family="regression", splittable=True)])


@dataclass
class Served:
    port: int
    recorder: Recorder
    server: grpc.Server = field(repr=False)

    def address(self, host: str = "localhost") -> str:
        return f"{host}:{self.port}"


def serve(credentials: grpc.ServerCredentials | None = None) -> Served:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[recorder])
    pb_grpc.add_LossServiceServicer_to_server(FixedService(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials) if credentials else server.add_insecure_port("127.0.0.1:0")
    server.start()
    return Served(port, recorder, server)


@pytest.fixture
def plaintext() -> Iterator[Served]:
    s = serve()
    yield s
    s.server.stop(None)


def tls_server(certs: Path, *, client_ca: bool) -> Served:
    pair = ((certs / "server-key.pem").read_bytes(), (certs / "server.pem").read_bytes())
    roots = (certs / "ca.pem").read_bytes() if client_ca else None
    return serve(grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=client_ca))


@pytest.fixture
def tls(certs: Path) -> Iterator[Served]:
    s = tls_server(certs, client_ca=False)
    yield s
    s.server.stop(None)


@pytest.fixture
def mtls(certs: Path) -> Iterator[Served]:
    s = tls_server(certs, client_ca=True)
    yield s
    s.server.stop(None)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOSSD_SERVER", "LOSSD_TLS", "LOSSD_TLS_CA_FILE", "LOSSD_TLS_CLIENT_CERT_FILE", "LOSSD_TLS_CLIENT_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LOSSD_TOKEN", raising=False)
    monkeypatch.delenv("LOSSD_TOKEN_FILE", raising=False)


BATCH = {"x": np.arange(4.0), "y": np.zeros(4)}


def exercise(client: Client) -> None:
    """One call of every rpc, the serialized-bytes Evaluate and the stream included."""
    assert client.evaluate(BATCH, "mse")["mse"].value == VALUE
    assert client.evaluate_stream([BATCH, BATCH], "mse")["mse"].value == VALUE
    assert client.finalize({"mse": pb.State(function="mse", version=1)})["mse"].value == VALUE
    assert [f.name for f in client.list_functions().functions] == ["mse"]


async def exercise_async(client: AsyncClient) -> None:
    assert (await client.evaluate(BATCH, "mse"))["mse"].value == VALUE
    assert (await client.evaluate_stream([BATCH], "mse"))["mse"].value == VALUE
    assert (await client.finalize({"mse": pb.State(function="mse", version=1)}))["mse"].value == VALUE
    assert [f.name for f in (await client.list_functions()).functions] == ["mse"]


RPCS = ["Evaluate", "EvaluateStream", "Finalize", "ListFunctions"]


# -- settings ----------------------------------------------------------------------------------


def test_settings_read_the_environment_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOSSD_SERVER", "lossd.example:443")
    monkeypatch.setenv("LOSSD_TLS_CA_FILE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("LOSSD_TOKEN", TOKEN)
    settings = ClientSettings.from_environment()
    assert settings == ClientSettings(address="lossd.example:443", ca_file=tmp_path / "ca.pem", token=TOKEN)
    assert settings.secure and settings.bearer_token() == TOKEN
    assert TOKEN not in repr(settings)
    # arguments win; a token file replaces the token; tls=False drops the certificate files
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}-2\n# comment lines after the first are ignored\n")
    changed = settings.override(address="localhost:1", token_file=token_file, tls=False)
    assert changed.address == "localhost:1" and not changed.secure and changed.token is None
    assert changed.bearer_token() == f"{TOKEN}-2"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"cert_file": Path("c.pem")}, "both cert_file and key_file"),
        ({"token": "a", "token_file": Path("t")}, "token or token_file, got both"),
        ({"token": "  "}, "non-empty"),
        ({"address": "lossd.example:50051", "token": "a"}, "a bearer token needs TLS to reach lossd.example:50051"),
        ({"address": ""}, "expected a server address"),
    ],
)
def test_settings_refuse_bad_combinations(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClientSettings(**values)


def test_bad_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_TLS", "maybe")
    with pytest.raises(ValueError, match="LOSSD_TLS: expected true or false, got 'maybe'"):
        ClientSettings.from_environment()


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("localhost:1", True), ("127.0.0.1:1", True), ("[::1]:1", True), ("unix:/tmp/s", True), ("10.0.0.1:1", False), ("lossd:1", False)],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ca_file: cannot read"):
        channel_credentials(ClientSettings(address="lossd:1", ca_file=tmp_path / "absent.pem"))
    with pytest.raises(ValueError, match="token_file: cannot read"):
        Client("127.0.0.1:1", token_file=tmp_path / "absent")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="token_file: expected a token"):
        Client("127.0.0.1:1", token_file=tmp_path / "empty")


def test_arguments_complete_what_the_environment_alone_refuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOSSD_SERVER", "lossd.example:443")
    monkeypatch.setenv("LOSSD_TOKEN", TOKEN)
    with pytest.raises(ValueError, match="needs TLS"):
        ClientSettings.from_environment()
    assert ClientSettings.from_environment(ca_file=tmp_path / "ca.pem").secure
    monkeypatch.setenv("LOSSD_TOKEN_FILE", str(tmp_path / "absent"))  # with LOSSD_TOKEN: ambiguous
    with pytest.raises(ValueError, match="token or token_file, got both"):
        ClientSettings.from_environment(tls=True)
    assert ClientSettings.from_environment(tls=True, token="chosen").bearer_token() == "chosen"


# -- tokens ------------------------------------------------------------------------------------


def test_token_rides_on_every_call_of_both_clients(plaintext: Served) -> None:
    with Client(plaintext.address("127.0.0.1"), token=TOKEN, chunk_bytes=8) as client:  # chunk_bytes: the stream goes in parts
        exercise(client)

    async def main() -> None:
        async with AsyncClient(plaintext.address(), token=TOKEN) as client:
            await exercise_async(client)

    asyncio.run(main())
    methods = [m for m, _ in plaintext.recorder.calls]
    assert set(methods) == set(RPCS) and methods.count("EvaluateStream") >= 2
    assert {auth for _, auth in plaintext.recorder.calls} == {f"Bearer {TOKEN}"}


def test_no_token_sends_no_authorization(plaintext: Served) -> None:
    with Client(plaintext.address("127.0.0.1")) as client:
        exercise(client)
    assert {auth for _, auth in plaintext.recorder.calls} == {None}


def test_token_from_the_environment(plaintext: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOSSD_SERVER", plaintext.address("127.0.0.1"))
    monkeypatch.setenv("LOSSD_TOKEN", TOKEN)
    with Client() as client:  # the address and the token, both from the environment
        client.list_functions()
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.delenv("LOSSD_TOKEN")
    monkeypatch.setenv("LOSSD_TOKEN_FILE", str(token_file))

    async def main() -> None:
        async with AsyncClient() as client:
            await client.list_functions()

    asyncio.run(main())
    assert [auth for _, auth in plaintext.recorder.calls] == [f"Bearer {TOKEN}", "Bearer from-file"]


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_with_the_ca_and_a_token(tls: Served, certs: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with Client(tls.address(), ca_file=certs / "ca.pem", token_file=token_file) as client:
        exercise(client)

    async def main() -> None:
        async with AsyncClient(tls.address(), ca_file=certs / "ca.pem") as client:
            await exercise_async(client)

    asyncio.run(main())
    auths = [auth for _, auth in tls.recorder.calls]
    assert auths[:4] == [f"Bearer {TOKEN}"] * 4 and set(auths[4:]) == {None}


def test_state_files_and_finalize_over_tls(tls: Served, certs: Path, tmp_path: Path) -> None:
    with Client(tls.address(), ca_file=certs / "ca.pem", token=TOKEN) as client:
        run = client.run("mse")
        run.update(BATCH)
        path = save_states(tmp_path / "rank0.lossd", run)
        assert finalize_files(client, [path])["mse"].value == VALUE
    assert [m for m, _ in tls.recorder.calls] == ["Evaluate", "Finalize"]


@pytest.mark.parametrize("how", ["plaintext", "system roots"])
def test_tls_server_refuses_what_cannot_verify_it(tls: Served, how: str) -> None:
    arguments: dict[str, Any] = {"tls": True} if how == "system roots" else {}
    with Client(tls.address(), attempts=1, timeout=10, **arguments) as client:
        with pytest.raises(UnavailableError):
            client.list_functions()
    assert tls.recorder.calls == []


def test_mutual_tls(mtls: Served, certs: Path) -> None:
    with Client(mtls.address(), ca_file=certs / "ca.pem", attempts=1, timeout=10) as client:
        with pytest.raises(UnavailableError):  # no client certificate: the handshake fails
            client.list_functions()
    with Client(mtls.address(), ca_file=certs / "ca.pem", cert_file=certs / "client.pem", key_file=certs / "client-key.pem") as client:
        exercise(client)
    assert [m for m, _ in mtls.recorder.calls] == ["Evaluate", "EvaluateStream", "Finalize", "ListFunctions"]


def test_tls_settings_from_the_environment(tls: Served, certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_SERVER", tls.address())
    monkeypatch.setenv("LOSSD_TLS_CA_FILE", str(certs / "ca.pem"))
    monkeypatch.setenv("LOSSD_TOKEN", TOKEN)
    with Client() as client:
        client.list_functions()
    assert tls.recorder.calls == [("ListFunctions", f"Bearer {TOKEN}")]
