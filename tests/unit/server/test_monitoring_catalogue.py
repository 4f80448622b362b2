"""Every function of the catalogue that has a mean exports it; device metrics have their shape, and only on CUDA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from catalogue_inputs import valid_inputs
from helpers import assert_close
from lossd.kernels import all_functions, evaluate
from lossd.server.monitoring import DeviceCollector, DeviceStats, EvaluationEvent, Monitoring
from lossd.server.settings import Settings
from lossd.v1 import lossd_pb2 as pb

FAMILY = {"metric": "lossd_metric", "calibration": "lossd_metric"}  # every other catalogue family is a loss


def _samples(registry: CollectorRegistry, name: str) -> dict[str, float]:
    return {s.labels["function"]: s.value for f in registry.collect() for s in f.samples if s.name == name}


@pytest.mark.parametrize("fdef", all_functions(), ids=lambda f: f.name)
def test_every_additive_function_exports_numerator_and_denominator(fdef) -> None:  # type: ignore[no-untyped-def]
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in valid_inputs(fdef.name, np.random.default_rng(0)).items()}
    evaluation = evaluate(tensors, [fdef.name])
    result = evaluation.results[fdef.name]
    monitoring = Monitoring(Settings(device="cpu"))
    tags = pb.Tags(model="m", dataset="d", split="s")
    monitoring.observe(EvaluationEvent("Evaluate", 1, tags, evaluation, evaluation.batch, evaluation.prepared))
    exported = {
        prefix: (_samples(monitoring.registry, f"{prefix}_numerator_total"), _samples(monitoring.registry, f"{prefix}_denominator_total"))
        for prefix in ("lossd_loss", "lossd_metric")
    }
    expected_prefix = FAMILY.get(fdef.family, "lossd_loss")
    other = {"lossd_loss": "lossd_metric", "lossd_metric": "lossd_loss"}[expected_prefix]
    assert exported[other] == ({}, {}), f"{fdef.name} ({fdef.family}) exported under {other}"
    numerators, denominators = exported[expected_prefix]
    if result.numerator is None:  # the registry says its value is no additive mean (ECE, AUROC, perplexity...)
        assert numerators == {} and denominators == {}
        return
    skipped = {
        s.labels["reason"]: s.value for f in monitoring.registry.collect() for s in f.samples if s.name == "lossd_monitoring_skipped_total"
    }
    if result.numerator < 0:  # a counter cannot go down: a signed batch total is skipped, and counted
        assert numerators == {} and skipped == {"negative": 1.0}
        return
    assert result.denominator is not None and math.isfinite(result.numerator)
    assert_close(numerators[fdef.name], result.numerator, rtol=1e-12, atol=0, what=f"{fdef.name} numerator")
    assert_close(denominators[fdef.name], result.denominator, rtol=0, atol=0, what=f"{fdef.name} denominator")
    assert_close(numerators[fdef.name] / denominators[fdef.name], result.value, rtol=1e-9, atol=1e-12, what=f"{fdef.name} mean")


def test_the_catalogue_exports_means_for_most_functions() -> None:
    additive = [
        f.name
        for f in all_functions()
        if evaluate({k: torch.from_numpy(np.asarray(v)) for k, v in valid_inputs(f.name, np.random.default_rng(0)).items()}, [f.name])
        .results[f.name]
        .numerator
        is not None
    ]
    assert len(additive) >= 45 and {"accuracy", "brier", "log_loss", "lm_cross_entropy", "cross_entropy", "mse"} <= set(additive)


def test_device_collector_shape_with_a_fake_provider() -> None:
    stats = [DeviceStats("cuda:0", 3.0 * 2**30, 4.0 * 2**30, 0.75), DeviceStats("cuda:1", 1.0, 2.0, None)]
    registry = CollectorRegistry()
    registry.register(DeviceCollector(lambda: stats))
    families = {f.name: f for f in registry.collect()}
    assert set(families) == {"lossd_cuda_memory_allocated_bytes", "lossd_cuda_memory_reserved_bytes", "lossd_cuda_utilization_ratio"}
    assert all(f.type == "gauge" for f in families.values())
    assert {s.labels["device"]: s.value for s in families["lossd_cuda_memory_reserved_bytes"].samples} == {
        "cuda:0": 4.0 * 2**30,
        "cuda:1": 2.0,
    }
    assert [(s.labels, s.value) for s in families["lossd_cuda_utilization_ratio"].samples] == [({"device": "cuda:0"}, 0.75)]


def test_device_metrics_register_only_with_a_device_provider() -> None:
    names = {f.name for f in Monitoring(Settings(device="cpu")).registry.collect()}
    assert not any(n.startswith("lossd_cuda_") for n in names)
    with_device = Monitoring(Settings(device="cpu"), device_stats=lambda: [DeviceStats("cuda:0", 1.0, 2.0)])
    names = {f.name for f in with_device.registry.collect()}
    assert {"lossd_cuda_memory_allocated_bytes", "lossd_cuda_memory_reserved_bytes"} <= names
    assert "lossd_cuda_utilization_ratio" not in names  # no NVML reading: absent, not 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_monitoring_reads_torch_memory() -> None:
    x = torch.ones(1 << 20, device="cuda")
    families = {f.name: f for f in Monitoring(Settings(device="cuda")).registry.collect()}
    (allocated,) = families["lossd_cuda_memory_allocated_bytes"].samples
    assert allocated.value >= x.numel() * 4 and allocated.labels["device"].startswith("cuda:")
