"""The serving benchmark's harness works: it starts `lossd serve` in its own process and drives one tiny scenario."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_bench_serve_runs_one_small_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(ROOT / "bench" / "bench_serve.py"), "--quick", "--only", "small_seq", "--scale", "0.3", "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {row["target"]: row for row in report["rows"]}
    assert set(rows) == {"lossd", "lossd ×2"}  # one process, and lossd serve --workers 2
    for row in rows.values():
        assert row["scenario"] == "small_seq"
        # Timings are the benchmark's to report, not a test's to judge (shared, noisy machines):
        # check only that both sides were measured.
        assert row["torch_s"] > 0 and row["seconds"] > 0
        assert 0 < row["notes"]["p50_ms"] <= row["notes"]["p99_ms"]
    limits = report["limits"]
    assert limits["tcp_gb_per_s"] > 0 and limits["memcpy_gb_per_s"] > 0
    assert 0 < limits["tcp_round_trip_ms"] < limits["grpc_round_trip_ms"] < limits["grpc_16mb_ms"]  # grpcio costs more than the socket
    assert "| [64, 10] sequential" in done.stdout
