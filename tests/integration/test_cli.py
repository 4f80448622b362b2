"""The `lossd` command as users run it: eval against the session server, functions, serve."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from integration.conftest import start_server

from lossd.client import Client
from lossd.client.cli import main
from lossd.client.distributed import save_states

LOSSD = [sys.executable, "-m", "lossd.client.cli"]  # the `lossd` command
N, K = 48, 6


def lossd(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LOSSD, *args], capture_output=True, text=True, timeout=timeout, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"logits": (rng.standard_normal((N, K)) * 2).astype(np.float32), "labels": rng.integers(0, K, N)}


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory, arrays: dict[str, np.ndarray]) -> Path:
    path = tmp_path_factory.mktemp("eval") / "batch.npz"
    np.savez(path, **arrays)
    return path


def test_eval_json_matches_torch(address: str, npz: Path, arrays: dict) -> None:
    result = lossd("eval", "--server", address, "--inputs", str(npz), "--fn", "cross_entropy", "--tag", "model=cli-test", "--json")
    assert result.returncode == 0, result.stderr
    obj = json.loads(result.stdout)  # exactly one JSON object, nothing else on stdout
    assert set(obj) == {"results", "diagnostics"} and obj["diagnostics"] == []
    expected = float(F.cross_entropy(torch.from_numpy(arrays["logits"]), torch.from_numpy(arrays["labels"])))
    assert obj["results"]["cross_entropy"] == pytest.approx(expected, rel=1e-6)


def test_eval_json_equals_the_client_object(address: str, npz: Path, arrays: dict) -> None:
    specs = [
        "cross_entropy:label_smoothing=0.1",
        "accuracy",
        "ece:n_bins=5",
        '{"name": "cross_entropy", "alias": "ce_sum", "params": {"reduction": "sum"}}',
    ]
    result = lossd("eval", "--server", address, "--inputs", str(npz), *(x for s in specs for x in ("--fn", s)), "--json")
    assert result.returncode == 0, result.stderr
    with Client(address) as client:
        assert json.loads(result.stdout) == client.evaluate(arrays, specs).to_json()


def test_eval_table(address: str, npz: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--server", address, "--inputs", str(npz), "--fn", "cross_entropy", "--fn", "accuracy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["function", "value", "denominator"]
    assert lines[1].startswith("cross_entropy") and f"{N} samples" in lines[1]
    assert lines[2].startswith("accuracy")


def test_eval_invalid_argument_exits_2_with_the_violations(address: str, npz: Path) -> None:
    result = lossd("eval", "--server", address, "--inputs", str(npz), "--fn", "cross_entropy:label_smoothing=5")
    assert result.returncode == 2 and result.stdout == ""
    assert "INVALID_ARGUMENT" in result.stderr and "functions[0].params.label_smoothing" in result.stderr and "[0, 1]" in result.stderr
    assert_no_traceback(result)


def test_eval_bad_labels(address: str, tmp_path: Path, arrays: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.npz"
    labels = arrays["labels"].copy()
    labels[5] = K + 1
    np.savez(path, logits=arrays["logits"], labels=labels)
    assert main(["eval", "--server", address, "--inputs", str(path), "--fn", "cross_entropy", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "tensors.labels" in err and "index 5" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--inputs", "/nonexistent/batch.npz", "--fn", "cross_entropy"], "No such file"),
        (["--fn", "cross_entropy:label_smoothing"], "expected param=value"),
    ],
)
def test_eval_local_errors_exit_2(address: str, npz: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--server", address, *(["--inputs", str(npz)] if "--inputs" not in args else []), *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_refuses_a_single_array_file(address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.npy"
    np.save(path, np.zeros(3))
    assert main(["eval", "--server", address, "--inputs", str(path), "--fn", "mse"]) == 2
    assert "expected an .npz archive" in capsys.readouterr().err


def test_eval_refuses_a_file_that_is_not_an_archive(address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "batch.csv"
    path.write_text("1,2,3\n")
    assert main(["eval", "--server", address, "--inputs", str(path), "--fn", "mse"]) == 2
    err = capsys.readouterr().err
    assert "not a zip archive" in err and "pickled" not in err  # numpy alone calls any such file pickled data


def test_eval_refuses_an_array_no_function_reads_and_array_selects(
    address: str, tmp_path: Path, arrays: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "extra.npz"
    np.savez(path, **arrays, weight=np.ones(N))  # a misspelt "weights" would change nothing: refused, not ignored
    assert main(["eval", "--server", address, "--inputs", str(path), "--fn", "cross_entropy"]) == 2
    err = capsys.readouterr().err
    assert "tensors.weight" in err and "did you mean 'weights'" in err
    selected = ["--array", "logits", "--array", "labels", "--fn", "cross_entropy", "--json"]
    assert main(["eval", "--server", address, "--inputs", str(path), *selected]) == 0
    value = json.loads(capsys.readouterr().out)["results"]["cross_entropy"]
    expected = F.cross_entropy(torch.from_numpy(arrays["logits"]).double(), torch.from_numpy(arrays["labels"]))
    assert value == pytest.approx(float(expected), rel=1e-6)
    assert main(["eval", "--server", address, "--inputs", str(path), "--array", "logit", "--fn", "cross_entropy"]) == 2
    assert "has no array named 'logit'; it has: logits, labels, weight" in capsys.readouterr().err


def test_eval_unreachable_server_exits_1(npz: Path) -> None:
    result = lossd("eval", "--server", f"127.0.0.1:{free_port()}", "--inputs", str(npz), "--fn", "cross_entropy", "--timeout", "1")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr
    assert_no_traceback(result)


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["serve", "--device", "tpu"], ["eval", "--fn", "x"], ["eval", "--inputs", "a.npz", "--fn", "x", "--tag", "team=a"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_serve_refuses_invalid_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOSSD_GRPC_PORT", "not-a-port")
    assert main(["serve"]) == 2
    assert "grpc_port" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_serve_refuses_a_missing_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--device", "cuda:0", "--grpc-port", "0", "--http-port", "0"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_functions_local_equals_server(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["functions", "--json"]) == 0
    local = capsys.readouterr().out
    assert main(["functions", "--json", "--server", address]) == 0
    assert capsys.readouterr().out == local
    catalogue = json.loads(local)
    ce = next(f for f in catalogue["functions"] if f["name"] == "cross_entropy")
    assert ce["splittable"] is True and ce["reference"]
    smoothing = next(p for p in ce["params"] if p["name"] == "label_smoothing")
    assert smoothing["default"] == 0.0 and smoothing["range"] == "[0, 1]" and smoothing["type"] == "float"
    assert {r["name"] for r in ce["roles"]} >= {"logits", "labels"} and ce["outputs"][0]["name"] == "value"
    assert catalogue["diagnostics"]


def test_functions_table_and_family(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["functions", "--family", "classification"]) == 0
    local = capsys.readouterr().out
    assert "\ncross_entropy  (classification, splittable)" in "\n" + local
    assert "param  label_smoothing: float = 0.0 in [0, 1]" in local and "ignore_index: int = -100:" in local
    assert main(["functions", "--family", "classification", "--server", address]) == 0
    assert capsys.readouterr().out == local
    assert main(["functions", "--family", "astrology", "--server", address]) == 2
    assert "family" in capsys.readouterr().err
    assert main(["functions", "--family", "astrology"]) == 2
    assert "expected one of" in capsys.readouterr().err


def wait_serving(address: str, deadline: float) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"lossd serve did not report SERVING on {address}")
            time.sleep(0.1)


def test_serve_starts_answers_and_stops_on_sigterm(arrays: dict) -> None:
    grpc_port, http_port = free_port(), free_port()
    env = {**os.environ, "LOSSD_HTTP_PORT": str(http_port), "LOSSD_GRPC_PORT": "1", "LOSSD_DEVICE": "cpu"}  # the flag beats the environment
    process = subprocess.Popen(
        [*LOSSD, "serve", "--grpc-port", str(grpc_port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", time.monotonic() + 60)
        with Client(f"127.0.0.1:{grpc_port}", timeout=30) as client:
            out = client.evaluate(arrays, "cross_entropy")
        assert out["cross_entropy"].value == pytest.approx(
            float(F.cross_entropy(torch.from_numpy(arrays["logits"]), torch.from_numpy(arrays["labels"]))), rel=1e-6
        )
        deadline = time.monotonic() + 30
        while True:  # the gateway comes up on the port from the environment
            try:
                assert httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=2).status_code == 200
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert f"127.0.0.1:{grpc_port}" in stdout
    assert "Traceback" not in stderr, stderr


def test_finalize_merges_state_files_of_ranks(address: str, arrays: dict, tmp_path: Path) -> None:
    functions = ["cross_entropy", "accuracy"]
    with Client(address) as client:
        paths = []
        for rank, rows in enumerate((slice(0, 20), slice(20, 20), slice(20, N))):  # rank 1 saw no batch
            run = client.run(functions, tags={"model": "cli-test"})
            if rows.stop > rows.start:
                run.update({k: v[rows] for k, v in arrays.items()})
            paths.append(str(save_states(tmp_path / f"rank{rank}.lossd", run)))
        whole = client.evaluate(arrays, functions).to_json()["results"]
    result = lossd("finalize", "--server", address, *paths, "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)["results"]  # exactly one JSON object
    assert got.keys() == whole.keys()
    assert all(math.isclose(got[k], whole[k], rel_tol=1e-9) for k in whole), (got, whole)
    table = lossd("finalize", "--server", address, *paths)
    assert table.returncode == 0 and table.stdout.startswith("function") and "cross_entropy" in table.stdout


def test_finalize_bad_files_exit_2_without_traceback(address: str, npz: Path, tmp_path: Path) -> None:
    for path, message in ((npz, "expected a lossd state file"), (tmp_path / "absent.lossd", "No such file")):
        result = lossd("finalize", "--server", address, str(path))
        assert result.returncode == 2 and result.stderr.startswith("lossd finalize: ") and message in result.stderr, result.stderr
        assert_no_traceback(result)


# -- packaging: the client commands without torch, `serve` from lossd-server, versions ---------


def test_eval_imports_no_torch(address: str, npz: Path, arrays: dict) -> None:
    code = (
        "import sys\n"
        "from lossd.client.cli import main\n"
        f"code = main(['eval', '--server', {address!r}, '--inputs', {str(npz)!r}, '--fn', 'cross_entropy', '--json'])\n"
        "heavy = [m for m in ('torch', 'lossd.kernels', 'lossd.server.app') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    expected = float(F.cross_entropy(torch.from_numpy(arrays["logits"]), torch.from_numpy(arrays["labels"])))
    assert json.loads(result.stdout)["results"]["cross_entropy"] == pytest.approx(expected, rel=1e-6)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import lossd.client

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"lossd-client {lossd.client.__version__}" in out and "lossd-server " in out and "lossd-kernels " in out


def test_serve_without_lossd_server_says_what_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import lossd.client.cli

    monkeypatch.setattr(lossd.client.cli, "entry_points", lambda group: [])  # as where only lossd-client is installed
    assert main(["serve", "--grpc-port", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "lossd-server" in err[0] and err[0].startswith("lossd serve: ")


BLOCK_SERVER_AND_KERNELS = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[:2] in (["lossd", "kernels"], ["lossd", "server"]):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Absent())
from lossd.client.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_functions_without_kernels_asks_for_a_server(address: str) -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_SERVER_AND_KERNELS, "functions"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--server" in result.stderr and "lossd-kernels" in result.stderr, result.stderr
    asked = subprocess.run(
        [sys.executable, "-c", BLOCK_SERVER_AND_KERNELS, "functions", "--server", address, "--family", "regression"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert asked.returncode == 0 and "mse  (regression" in asked.stdout, asked.stderr


# -- TLS and tokens ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A lossd server with TLS and a token file; yields its address and the certificates' folder."""
    certs = tmp_path_factory.mktemp("certs")
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_certs.py"), "--out", str(certs)], check=True, capture_output=True, timeout=60
    )
    (certs / "token").write_text(TOKEN + "\n")
    (certs / "server-tokens").write_text(f"cli-test:{TOKEN}\n")
    server = start_server(
        tls_cert_file=certs / "server.pem", tls_key_file=certs / "server-key.pem", auth_tokens_file=certs / "server-tokens"
    )
    yield f"localhost:{server.address.rsplit(':', 1)[1]}", certs
    server.stop()


TOKEN = "cli-test-token-0123456789"


def test_eval_finalize_functions_over_tls_with_a_token(secured: tuple[str, Path], address: str, npz: Path, arrays: dict) -> None:
    tls_address, certs = secured
    flags = ["--server", tls_address, "--tls-ca", str(certs / "ca.pem"), "--token-file", str(certs / "token")]
    specs = ["--fn", "cross_entropy", "--fn", "ece:n_bins=5"]
    secure = lossd("eval", *flags, "--inputs", str(npz), *specs, "--json")
    plain = lossd("eval", "--server", address, "--inputs", str(npz), *specs, "--json")
    assert secure.returncode == 0 and plain.returncode == 0, secure.stderr
    assert json.loads(secure.stdout) == json.loads(plain.stdout)
    functions = lossd("functions", *flags, "--family", "regression", "--json")
    assert functions.returncode == 0 and {f["family"] for f in json.loads(functions.stdout)["functions"]} == {"regression"}
    # the same through the environment, set once for the job
    env = {**os.environ, "LOSSD_SERVER": tls_address, "LOSSD_TLS_CA_FILE": str(certs / "ca.pem"), "LOSSD_TOKEN": TOKEN}
    from_env = lossd("eval", "--inputs", str(npz), *specs, "--json", env=env)
    assert from_env.returncode == 0 and json.loads(from_env.stdout) == json.loads(plain.stdout), from_env.stderr


def test_finalize_state_files_over_tls(secured: tuple[str, Path], address: str, arrays: dict, tmp_path: Path) -> None:
    tls_address, certs = secured
    with Client(tls_address, ca_file=certs / "ca.pem", token_file=certs / "token") as client:
        paths = []
        for rank, rows in enumerate((slice(0, 30), slice(30, N))):
            run = client.run(["cross_entropy", "accuracy"])
            run.update({k: v[rows] for k, v in arrays.items()})
            paths.append(str(save_states(tmp_path / f"rank{rank}.lossd", run)))
    with Client(address) as plain:
        whole = plain.evaluate(arrays, ["cross_entropy", "accuracy"]).to_json()["results"]
    flags = ["--server", tls_address, "--tls-ca", str(certs / "ca.pem"), "--token-file", str(certs / "token")]
    result = lossd("finalize", *flags, *paths, "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)["results"]
    assert got.keys() == whole.keys() and all(math.isclose(got[k], whole[k], rel_tol=1e-9) for k in whole), (got, whole)


@pytest.mark.parametrize(
    ("extra", "message", "code"),
    [
        ([], "UNAVAILABLE", 1),  # plaintext against TLS
        (["--tls-ca", "CA"], "UNAUTHENTICATED", 1),  # TLS without a token
        (["--tls-ca", "CA", "--token-file", "/nonexistent/token"], "token_file: cannot read /nonexistent/token", 2),
        (["--tls-cert", "CA"], "both cert_file and key_file", 2),
    ],
)
def test_eval_security_failures_are_one_clear_line(secured: tuple[str, Path], npz: Path, extra: list[str], message: str, code: int) -> None:
    tls_address, certs = secured
    extra = [str(certs / "ca.pem") if x == "CA" else x for x in extra]
    result = lossd("eval", "--server", tls_address, *extra, "--inputs", str(npz), "--fn", "cross_entropy", "--timeout", "5")
    assert result.returncode == code and message in result.stderr and result.stderr.startswith("lossd eval: "), result.stderr
    assert_no_traceback(result)
