"""The hand-written endpoint a team writes in an afternoon: FastAPI, raw bytes in, torch, JSON out.

POST /evaluate?functions=cross_entropy,accuracy with headers x-rows, x-classes
and x-dtype (float32 | bfloat16); the body is the logits' bytes followed by the
int64 labels' bytes. No validation beyond the sizes, no monitoring, no states.

    python bench/peers/fastapi_peer.py --port 8001
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _workloads import torch_functions  # noqa: E402

app = FastAPI()
WIDTH = {"float32": 4, "bfloat16": 2}
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The body is read-only bytes; torch only reads it.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@app.get("/health")
def health() -> dict[str, str]:
    """Ready once uvicorn listens."""
    return {"status": "ok"}


@app.post("/evaluate")
async def evaluate(request: Request, functions: str = "cross_entropy") -> dict[str, float]:
    """Decode the raw body (torch.frombuffer, no copy) and run torch on it."""
    rows, classes = int(request.headers["x-rows"]), int(request.headers["x-classes"])
    dtype = request.headers.get("x-dtype", "float32")
    body = await request.body()
    split = rows * classes * WIDTH[dtype]
    if len(body) != split + rows * 8:
        raise HTTPException(400, f"expected {split + rows * 8} bytes, got {len(body)}")
    z = torch.frombuffer(body, dtype=TORCH[dtype], count=rows * classes).view(rows, classes)
    y = torch.frombuffer(body, dtype=torch.int64, offset=split)
    return torch_functions(z, y, functions.split(","))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
