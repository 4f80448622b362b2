"""The one client core: the split decision and its cache, request building, the connection flags of the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lossd.client.cli import build_parser
from lossd.client.cli.common import connection_settings
from lossd.client.core import ClientCore, payload_of
from lossd.client.messages import function_specs
from lossd.client.settings import ClientSettings
from lossd.v1 import lossd_pb2 as pb

CATALOGUE = pb.ListFunctionsResponse(
    functions=[
        pb.FunctionInfo(name="cross_entropy", family="classification", splittable=True, aliases=["ce"]),
        pb.FunctionInfo(name="nt_xent", family="embedding", splittable=False),
    ]
)
BIG = {"logits": np.zeros((64, 8), np.float32), "labels": np.zeros(64, np.int64)}  # 2.5 KiB
SMALL = {"logits": np.zeros((2, 8), np.float32), "labels": np.zeros(2, np.int64)}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOSSD_SERVER", "LOSSD_TLS", "LOSSD_TLS_CA_FILE", "LOSSD_TOKEN", "LOSSD_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


def core(chunk_bytes: int | None = 256) -> ClientCore:
    return ClientCore("127.0.0.1:1", chunk_bytes=chunk_bytes)


def test_small_batches_never_ask_for_the_catalogue() -> None:
    c = core()
    specs = function_specs("nt_xent")
    assert not c.needs_catalogue(specs, SMALL) and not c.should_chunk(specs, SMALL)
    assert not core(None).needs_catalogue(specs, BIG) and not core(None).should_chunk(specs, BIG)


@pytest.mark.parametrize(
    ("functions", "split"),
    [
        (["cross_entropy"], True),
        (["ce"], True),  # an alias
        (["cross_entropy", "nt_xent"], False),  # one function that needs the whole batch keeps it whole
        (["nt_xent"], False),
        (["unknown_to_the_catalogue"], False),
        (["cross_entropy:reduction=none"], False),  # per-element values cannot be merged from parts
    ],
)
def test_split_decision(functions: list[str], split: bool) -> None:
    c = core()
    specs = function_specs(functions)
    assert c.needs_catalogue(specs, BIG)
    with pytest.raises(RuntimeError, match="lossd bug"):
        c.may_split(specs, BIG)
    c.learn("", CATALOGUE)
    assert not c.needs_catalogue(specs, BIG)
    assert c.should_chunk(specs, BIG) is split


def test_a_family_catalogue_is_not_cached() -> None:
    c = core()
    c.learn("embedding", pb.ListFunctionsResponse(functions=[CATALOGUE.functions[1]]))
    assert c.needs_catalogue(function_specs("cross_entropy"), BIG)


def test_twins_share_the_cache() -> None:
    a, b = core(), core()
    b.share_catalogue(a)
    a.learn("", CATALOGUE)
    assert not b.needs_catalogue(function_specs("cross_entropy"), BIG) and b.should_chunk(function_specs("cross_entropy"), BIG)


def test_stream_messages_split_only_splittable_batches() -> None:
    c = core()
    asked: list[int] = []

    def catalogue() -> pb.ListFunctionsResponse:
        asked.append(1)
        c.learn("", CATALOGUE)
        return CATALOGUE

    def messages(functions: str) -> list[pb.EvaluateRequest]:
        sent = c.stream_messages([BIG, SMALL], functions, tags=None, return_state=False, request_id="r", catalogue=catalogue)
        return [pb.EvaluateRequest.FromString(m) for m in sent]

    split = messages("cross_entropy")
    assert len(split) > 2 and split[0].functions[0].name == "cross_entropy" and split[0].request_id == "r"
    assert sum(m.tensors["labels"].shape[0] for m in split) == 66 and {m.batch_id for m in split[:-1]} == {"batch-0"}
    assert len(messages("nt_xent")) == 2  # one message per batch: nothing split
    assert asked == [1]  # learnt once


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("timeout", 0, "expected timeout > 0"),
        ("chunk_bytes", 0, "expected chunk_bytes to be a positive integer"),
        ("address", "", "expected a server address"),
        ("credentials", "not credentials", "expected credentials to be grpc.ChannelCredentials"),
    ],
)
def test_bad_arguments(argument: str, value: object, message: str) -> None:
    arguments: dict[str, object] = {"address": "127.0.0.1:1", argument: value}
    with pytest.raises((ValueError, TypeError), match=message):
        ClientCore(**arguments)  # type: ignore[arg-type]


def test_payload_of_refuses_other_objects() -> None:
    with pytest.raises(TypeError, match="expected a lossd.v1.EvaluateRequest or its bytes, got dict"):
        payload_of({})  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["eval", "finalize", "functions"])
def test_client_commands_take_the_connection_flags(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    required = {"eval": ["--inputs", "a.npz", "--fn", "mse"], "finalize": ["a.lossd"], "functions": []}[command]
    monkeypatch.setenv("LOSSD_SERVER", "localhost:1")
    monkeypatch.setenv("LOSSD_TOKEN", "from-env")
    args = build_parser().parse_args([command, *required])
    assert connection_settings(args) == ClientSettings(address="localhost:1", token="from-env")
    (tmp_path / "token").write_text("from-file")
    flags = ["--server", "h:2", "--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem", "--token-file", str(tmp_path / "token")]
    args = build_parser().parse_args([command, *required, *flags])
    settings = connection_settings(args)
    assert settings == ClientSettings(
        address="h:2", ca_file=Path("ca.pem"), cert_file=Path("c.pem"), key_file=Path("k.pem"), token_file=tmp_path / "token"
    )
    assert settings.secure and settings.bearer_token() == "from-file"
