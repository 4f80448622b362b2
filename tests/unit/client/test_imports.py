"""The client stays thin: importing it never imports torch (nor the server or the kernels)."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_import_torch() -> None:
    code = (
        "import lossd.client, sys; bad = [m for m in ('torch', 'lossd.kernels', 'lossd.server') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_api() -> None:
    import lossd.client

    for name in ("Client", "AsyncClient", "Run", "AsyncRun", "EvaluationResult", "LossdError", "InvalidArgumentError", "GRPC_OPTIONS"):
        assert name in lossd.client.__all__ and hasattr(lossd.client, name)


def test_the_lossd_command_parses_without_torch() -> None:
    code = (
        "import sys\n"
        "from lossd.client.cli import build_parser\n"
        "args = build_parser().parse_args(['eval', '--inputs', 'a.npz', '--fn', 'cross_entropy', '--tls-ca', 'ca.pem'])\n"
        "assert args.handler.__module__ == 'lossd.client.cli.eval'\n"
        "heavy = [m for m in ('torch', 'lossd.kernels', 'lossd.server.app', 'lossd.server.settings') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_one_version_attribute_per_package() -> None:
    from importlib.metadata import version

    import lossd.client
    import lossd.kernels
    import lossd.server

    assert lossd.client.__version__ == version("lossd-client")
    assert lossd.kernels.__version__ == version("lossd-kernels")
    assert lossd.server.__version__ == version("lossd-server")


def test_import_does_not_import_ml_dtypes() -> None:
    # Its import registers hundreds of ufunc loops (about a second): paid on the first bfloat16 tensor only.
    code = "import lossd.client, sys; assert 'ml_dtypes' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
