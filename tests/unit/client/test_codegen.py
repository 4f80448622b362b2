"""The generated lossd.v1 code is what scripts/gen_proto.py produces from proto/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
GENERATED = ROOT / "client" / "lossd" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True, timeout=120)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "lossd" / "v1").iterdir() if p.is_file()}
    assert fresh, "gen_proto.py generated nothing"
    stale = [name for name, data in fresh.items() if not (GENERATED / name).exists() or (GENERATED / name).read_bytes() != data]
    assert not stale, f"client/lossd/v1/{', '.join(sorted(stale))} differ from proto/: run `python scripts/gen_proto.py`"
    extra = {p.name for p in GENERATED.glob("*_pb2*.py*")} - set(fresh)
    assert not extra, f"client/lossd/v1 holds generated files no proto produces: {sorted(extra)}"
