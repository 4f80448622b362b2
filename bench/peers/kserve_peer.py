"""A KServe custom model that computes the losses with torch: V2 gRPC (and REST), raw input contents.

Inputs: ``logits`` (FP32 or BF16, [N, K]) and ``labels`` (INT64, [N]) as raw
contents; request parameter ``functions`` (comma-separated names). Outputs:
one FP32 scalar per function. Runs in its own venv (bench/.peers/kserve,
built by ``make bench-peers``), never in the project's.

    bench/.peers/kserve/bin/python bench/peers/kserve_peer.py --grpc_port 8081 --http_port 8080
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import kserve
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _workloads import torch_functions  # noqa: E402

TORCH = {"FP32": torch.float32, "BF16": torch.bfloat16, "INT64": torch.int64}
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def _parameter(parameters: Any, name: str, default: str) -> str:
    value = (parameters or {}).get(name)
    if value is None:
        return default
    return str(getattr(value, "string_param", value))


class Losses(Model):
    """The model ``losses``: torch on the raw input bytes, no copies beyond gRPC's own."""

    def __init__(self) -> None:
        super().__init__("losses")
        self.ready = True

    def predict(self, payload: InferRequest, headers: Any = None, response_headers: Any = None) -> InferResponse:  # type: ignore[override]
        """Decode both inputs with torch.frombuffer and compute the requested functions."""
        tensors = {}
        for tensor in payload.inputs:
            raw = tensor._raw_data  # raw_input_contents; numpy has no BF16, so read the bytes with torch
            tensors[tensor.name] = torch.frombuffer(raw, dtype=TORCH[tensor.datatype]).view(tensor.shape)
        functions = _parameter(payload.parameters, "functions", "cross_entropy").split(",")
        values = torch_functions(tensors["logits"], tensors["labels"], functions)
        outputs = [InferOutput(name=name, shape=[1], datatype="FP32", data=[value]) for name, value in values.items()]
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.parse_known_args()
    ModelServer().start([Losses()])
