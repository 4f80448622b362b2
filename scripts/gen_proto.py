"""Regenerate lossd.v1 (Python, type stubs and gRPC stubs) from proto/lossd/v1/*.proto.

Run: python scripts/gen_proto.py [--out DIR]. The generated files live in
client/lossd/v1/ and are never edited by hand; tests/unit/client/test_codegen.py
fails when they are stale.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "lossd" / "v1").glob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "client", help="output root (lossd/v1/ is created under it)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
