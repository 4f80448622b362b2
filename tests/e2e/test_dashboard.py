"""The built-in dashboard in headless Chromium: after a few evaluations, every chart is drawn with data.

Also at 390 px wide (a phone): no horizontal overflow, and the cards of step-tagged, LM and untagged traffic."""

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
from cdp import Chromium
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
            for step in (100, 200, 300):  # free-form step tag, a metric on its own axis
                labels = rng.integers(0, 5, 200)
                logits = rng.normal(size=(200, 5)) + 2.0 * np.eye(5)[labels] * (step / 100)
                body = _body({"logits": logits.astype(np.float32), "labels": labels}, ["cross_entropy", "accuracy"])
                body["tags"] = {"model": "bert", "dataset": "glue", "split": "dev", "step": step, "checkpoint": f"ckpt-{step}"}
                assert client.post("/v1/evaluate", json=body).status_code == 200
            tokens = rng.integers(0, 50, (4, 12))  # a language model: [B, T, V] logits
            lm = _body({"logits": rng.normal(size=(4, 12, 50)).astype(np.float32), "labels": tokens}, ["lm_cross_entropy"])
            lm["tags"] = {"model": "gpt-tiny", "dataset": "wiki", "split": "test"}
            assert client.post("/v1/evaluate", json=lm).status_code == 200
            for functions in (["mse"], ["mse"], ["cross_entropy"]):  # untagged: one card per set of functions
                if functions == ["mse"]:
                    untagged = _body(
                        {"predictions": rng.normal(size=32).astype(np.float32), "targets": rng.normal(size=32).astype(np.float32)},
                        functions,
                    )
                else:
                    untagged = _body({"logits": rng.normal(size=(8, 3)).astype(np.float32), "labels": rng.integers(0, 3, 8)}, functions)
                assert client.post("/v1/evaluate", json=untagged).status_code == 200
        yield replica
    finally:
        replica.stop()


def _body(tensors: dict[str, np.ndarray], functions: list[str]) -> dict[str, object]:
    return {
        "tensors": {
            k: {"dtype": str(v.dtype), "shape": list(v.shape), "b64": base64.b64encode(v.tobytes()).decode()} for k, v in tensors.items()
        },
        "functions": functions,
    }


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
    kinds = [kind for kind, _ in charts]
    assert kinds.count("reliability") == 6 and kinds.count("metric") == 1 and kinds.count("perplexity") == 1, charts
    assert all(points > 0 for kind, points in charts if kind in ("loss", "metric", "perplexity")), charts
    assert sum(points for kind, points in charts if kind == "loss") >= 2 * 2 * 3  # two functions, several intervals, two cards
    assert 'data-axis="step"' in html  # the step-tagged card is plotted against its steps
    assert "now (last 0.5 s)" in html and "window (" in html  # current value and window aggregate, each labelled
    assert "untagged" in html and "(unset)" not in html
    for text in ("perplexity", "token-level", "ckpt-300", "accuracy", "glue"):
        assert text in html, text
    for text in ("vit-b16", "resnet50", "imagenet", "cross_entropy", "focal"):
        assert text in html
    assert html.count('class="line"') >= 6  # loss lines and ECE lines

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    result = _chromium(f"--screenshot={shot}", url, user_data=tmp_path / "profile-shot")
    assert result.returncode == 0 and shot.exists() and shot.stat().st_size > 20_000, result.stderr[-2000:]


def test_dashboard_fits_a_phone(fed_replica: Replica, tmp_path: Path) -> None:
    """At 390 px: every card drawn, nothing wider than the screen; a screenshot under artifacts/."""
    browser = Chromium(require_binary("chromium"), tmp_path / "profile-phone")
    try:
        browser.page(f"{fed_replica.url}/dashboard", 390, 844)
        browser.wait("document.body.dataset.loaded === 'true' && document.querySelectorAll('svg[data-chart]').length > 0")
        time.sleep(0.3)
        assert browser.evaluate("document.documentElement.scrollWidth") <= 390
        widest = browser.evaluate("Math.max(...[...document.querySelectorAll('body *')].map(e => e.getBoundingClientRect().right))")
        assert widest <= 390, widest
        assert browser.evaluate("document.querySelectorAll('article.card').length") == 6
        assert browser.evaluate("document.querySelectorAll('.stats.current').length") == 6
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard-390px.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 20_000
    finally:
        browser.close()
