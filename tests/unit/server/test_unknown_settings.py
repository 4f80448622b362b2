"""LOSSD_* variables that no setting reads are warned about when lossd serve starts: a misspelt one kept its default silently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lossd.server.cli import main
from lossd.server.unknown_settings import KNOWN_VARIABLES, unknown_variable_warnings

ROOT = Path(__file__).resolve().parents[3]


def test_a_misspelt_variable_is_named_with_the_one_meant() -> None:
    (line,) = unknown_variable_warnings({"LOSSD_ALLOW_SHARED_MEMROY": "true", "PATH": "/bin"})
    assert (
        line == "environment variable LOSSD_ALLOW_SHARED_MEMROY matches no setting and is ignored; did you mean LOSSD_ALLOW_SHARED_MEMORY?"
    )
    (line,) = unknown_variable_warnings({"LOSSD_NOTHING_LIKE_IT": "1"})
    assert "LOSSD_NOTHING_LIKE_IT matches no setting" in line and "did you mean" not in line


def test_settings_client_variables_and_kubernetes_service_links_are_not_warned_about() -> None:
    environ = {
        "LOSSD_MAX_CONCURRENT_REQUESTS": "8",
        "LOSSD_SERVER": "lossd:50051",  # the client's
        "LOSSD_TOKEN_FILE": "/run/token",
        "LOSSD_WORKER_INDEX": "1",  # the supervisor's to a worker
        "LOSSD_PORT": "tcp://10.0.0.7:50051",  # a Service named lossd, with enableServiceLinks on
        "LOSSD_PORT_50051_TCP_ADDR": "10.0.0.7",
        "LOSSD_SERVICE_HOST": "10.0.0.7",
        "LOSSD_SERVICE_PORT_GRPC": "50051",
    }
    assert unknown_variable_warnings(environ) == []


def test_every_variable_the_project_names_is_known() -> None:
    """The code, the container files and the chart name no variable that lossd serve would warn about."""
    sources = [*ROOT.glob("server/lossd/**/*.py"), *ROOT.glob("client/lossd/**/*.py"), *ROOT.glob("kernels/lossd/**/*.py")]
    sources += [*ROOT.glob("deploy/**/*.y*ml"), *ROOT.glob("deploy/docker/*"), ROOT / "Dockerfile", ROOT / "docker-compose.yml"]
    sources = [path for path in sources if path.is_file() and path.name != "unknown_settings.py"]  # its docstring's typo
    named = {m for path in sources for m in re.findall(r"\bLOSSD_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text())}
    named -= {"LOSSD_1_GPU", "LOSSD_2_GPU"}  # docker-compose.gpu.yml's own substitution variables, not lossd's
    unknown = {name for name in named if unknown_variable_warnings({name: "x"})}
    assert not unknown, f"read somewhere but not in KNOWN_VARIABLES: {sorted(unknown)}"
    assert "LOSSD_STREAM_IDLE_SECONDS" in KNOWN_VARIABLES and "LOSSD_LOCAL_SEND_INTERVAL" in KNOWN_VARIABLES


def test_lossd_serve_prints_the_warning_before_it_starts(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOSSD_MAX_CONCURENT_REQUESTS", "8")
    monkeypatch.setenv("LOSSD_GRPC_PORT", "-1")  # then refused: the test never starts a server
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "warning: environment variable LOSSD_MAX_CONCURENT_REQUESTS matches no setting" in err
    assert "did you mean LOSSD_MAX_CONCURRENT_REQUESTS?" in err and "LOSSD_GRPC_PORT" in err
