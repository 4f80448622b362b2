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
