"""The wire: gRPC round trips of a large logits batch vs in-process torch, default vs tuned HTTP/2.

Prints medians and ratios measured in this run:
  - torch.nn.functional.cross_entropy in process (the baseline, ratio 1.00)
  - lossd.kernels in process (same numbers as the service)
  - lossd over gRPC on loopback with default channel options and with the
    tuned options lossd uses (GRPC_OPTIONS), float32 and bfloat16 on the wire.

Usage: python bench/bench_wire.py [--rows 4096] [--classes 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_seconds, report  # noqa: E402

from lossd.client import Client  # noqa: E402
from lossd.client.codec import encode_tensors  # noqa: E402
from lossd.client.specs import specs_to_proto  # noqa: E402
from lossd.kernels import evaluate  # noqa: E402
from lossd.server.app import create_server  # noqa: E402
from lossd.server.settings import GRPC_OPTIONS, Settings  # noqa: E402
from lossd.v1 import lossd_pb2 as pb  # noqa: E402
from lossd.v1 import lossd_pb2_grpc as pb_grpc  # noqa: E402


def start_server() -> tuple[str, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    ready: list[str] = []
    done = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        running = loop.run_until_complete(create_server(Settings(grpc_port=0, device="cpu")))
        ready.append(running.address)
        done.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    done.wait(60)
    return ready[0], loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((args.rows, args.classes), dtype=np.float32)
    labels = rng.integers(0, args.classes, args.rows)
    z, y = torch.from_numpy(logits), torch.from_numpy(labels)
    nbytes = logits.nbytes

    baseline = median_seconds(lambda: F.cross_entropy(z, y), repeats=args.repeats)
    rows: list[tuple[str, float, float | None]] = [("torch F.cross_entropy (in process)", baseline, nbytes)]
    rows.append(
        (
            "lossd.kernels cross_entropy (in process)",
            median_seconds(lambda: evaluate({"logits": z, "labels": y}, ["cross_entropy"]), repeats=args.repeats),
            nbytes,
        )
    )

    address, _ = start_server()
    functions = specs_to_proto(["cross_entropy"])
    bf16 = z.to(torch.bfloat16)
    for wire_name, tensors, size in (
        ("float32", {"logits": z, "labels": y}, nbytes),
        ("bfloat16", {"logits": bf16, "labels": y}, nbytes // 2),
    ):
        request = pb.EvaluateRequest(tensors=encode_tensors(tensors), functions=functions)
        for label, options in (("default options", []), ("tuned HTTP/2", GRPC_OPTIONS)):
            channel = grpc.insecure_channel(
                address, options=[*options, ("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
            )
            stub = pb_grpc.LossServiceStub(channel)
            seconds = median_seconds(lambda: stub.Evaluate(request, timeout=120), repeats=args.repeats)
            rows.append((f"gRPC Evaluate, {wire_name} on the wire, {label}", seconds, size))
            channel.close()
        rows.append((f"  encode only ({wire_name})", median_seconds(lambda: encode_tensors(tensors), repeats=args.repeats), size))
        with Client(address) as client:  # requests serialized straight from the arrays (lossd.client.wire)
            rows.append(
                (
                    f"lossd Client.evaluate, {wire_name} on the wire",
                    median_seconds(lambda: client.evaluate(tensors, ["cross_entropy"]), repeats=args.repeats),
                    size,
                )
            )

    report(
        f"cross-entropy of [{args.rows}, {args.classes}] logits ({nbytes / 1e6:.1f} MB float32); ratios against torch in process",
        rows,
        baseline,
    )


if __name__ == "__main__":
    main()
