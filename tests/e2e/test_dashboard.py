"""The built-in dashboard in headless Chromium: after a few evaluations, every chart is drawn with data."""

from __future__ import annotations

import base64
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ARTIFACTS
from replica import Replica

from helpers import require_binary

pytestmark = pytest.mark.e2e

CHART = re.compile(r'<svg[^>]*data-chart="(?P<kind>\w+)"[^>]*data-points="(?P<points>\d+)"')


@pytest.fixture(scope="module")
def fed_replica() -> Iterator[Replica]:
    """Start a replica with half-second history intervals, fed two label sets whose calibration drifts."""
    replica = Replica(history_interval_seconds=0.5).start()
    rng = np.random.default_rng(3)
    try:
        with httpx.Client(base_url=replica.url, timeout=60) as client:
            for step in range(8):
                for model, scale in (("vit-b16", 1.0), ("resnet50", 0.5)):
                    labels = rng.integers(0, 10, 400)
                    logits = rng.normal(size=(400, 10))
                    logits[np.arange(400), labels] += 2.0
                    logits *= scale * (1 + 0.1 * step)  # growing over-confidence
                    tensors = {name: a for name, a in (("logits", logits.astype(np.float32)), ("labels", labels.astype(np.int64)))}
                    body = {
                        "tensors": {
                            k: {"dtype": str(v.dtype), "shape": list(v.shape), "b64": base64.b64encode(v.tobytes()).decode()}
                            for k, v in tensors.items()
                        },
                        "functions": ["cross_entropy", "focal"],
                        "tags": {"model": model, "dataset": "imagenet", "split": "val"},
                    }
                    assert client.post("/v1/evaluate", json=body).status_code == 200
                time.sleep(0.3)
        yield replica
    finally:
        replica.stop()


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    binary = require_binary("chromium")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={user_data}",
        "--window-size=1500,1300",
        "--virtual-time-budget=5000",  # lets the page fetch /v1/history and draw
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=90)


def test_dashboard_renders_charts_with_data(fed_replica: Replica, tmp_path: Path) -> None:
    url = f"{fed_replica.url}/dashboard"
    dom = _chromium("--dump-dom", url, user_data=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-loaded="true"' in html, "the page never loaded /v1/history"
    charts = [(m["kind"], int(m["points"])) for m in CHART.finditer(html)]
    assert [kind for kind, _ in charts] == ["loss", "ece", "reliability"] * 2, charts
    assert all(points > 0 for _, points in charts), charts
    assert sum(points for kind, points in charts if kind == "loss") >= 2 * 2 * 3  # two functions, several intervals, two cards
    for text in ("vit-b16", "resnet50", "imagenet", "cross_entropy", "focal"):
        assert text in html
    assert html.count('class="line"') >= 6  # loss lines and ECE lines

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    result = _chromium(f"--screenshot={shot}", url, user_data=tmp_path / "profile-shot")
    assert result.returncode == 0 and shot.exists() and shot.stat().st_size > 20_000, result.stderr[-2000:]
