"""The fleet-wide dashboard data: the same JSON as the local history, drawn from Prometheus.

With ``prometheus_url`` set, /v1/history asks Prometheus (its HTTP API) for
the recording rules of ``deploy/prometheus/rules/lossd.rules.yml``, which pool
every replica's counters before dividing: the window's values (the 1h rules)
and the current ones (the 5m rules) are those of all the fleet's traffic, not
of whichever replica the browser reached. The loss and ECE lines are the 5m
rules over the history window. Free-form tags (step, epoch) are not Prometheus
labels, so this source plots by time only.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from typing import Any

import httpx

from lossd.server.gateway.problems import Problem

__all__ = ["PrometheusHistory", "RULE_WINDOWS"]

# Windows of the recording rules: the dashboard's "current" value and its window aggregate.
RULE_WINDOWS = {"current": ("5m", 300.0), "window": ("1h", 3600.0)}
_MAX_POINTS = 720  # per line: a query_range step no finer than the window / this
_TAGS = ("model", "dataset", "split")

Key = tuple[str, str, str]


def _float(value: str) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _key(metric: dict[str, str]) -> Key:
    return metric.get("model", ""), metric.get("dataset", ""), metric.get("split", "")


class PrometheusHistory:
    """Queries one Prometheus for the dashboard's series; ``snapshot()`` answers what /v1/history returns."""

    def __init__(self, url: str, *, interval: float, bins: int, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.interval = interval
        self.bins = bins
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout)

    async def _get(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            response = await self._client.get(path, params=params)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Problem(503, "prometheus-unavailable", "Prometheus unavailable", f"prometheus_url {self.url}: {exc}") from None
        if response.status_code != 200 or body.get("status") != "success":
            detail = body.get("error", response.text[:200]) if isinstance(body, dict) else response.text[:200]
            raise Problem(503, "prometheus-unavailable", "Prometheus unavailable", f"prometheus_url {self.url}: {detail}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def _instant(self, expr: str, now: float) -> list[dict[str, Any]]:
        return await self._get("/api/v1/query", {"query": expr, "time": now})

    async def _range(self, expr: str, now: float) -> list[dict[str, Any]]:
        seconds = RULE_WINDOWS["window"][1]
        step = max(self.interval, seconds / _MAX_POINTS)
        return await self._get("/api/v1/query_range", {"query": expr, "start": now - seconds, "end": now, "step": step})

    async def snapshot(self) -> dict[str, Any]:
        """The fleet's series in the local history's JSON shape (``source`` says which)."""
        now = time.time()
        cur, win = RULE_WINDOWS["current"][0], RULE_WINDOWS["window"][0]
        instant = {
            "loss_current": f"model_dataset_split_function:lossd_loss:mean{cur}",
            "metric_current": f"model_dataset_split_function:lossd_metric:mean{cur}",
            "loss_window": f"model_dataset_split_function:lossd_loss:mean{win}",
            "metric_window": f"model_dataset_split_function:lossd_metric:mean{win}",
            "ece_current": f"model_dataset_split:lossd_ece:ratio{cur}",
            "ece_window": f"model_dataset_split:lossd_ece:ratio{win}",
            "count_current": f"model_dataset_split:lossd_calibration_predictions:increase{cur}",
            "count_window": f"model_dataset_split:lossd_calibration_predictions:increase{win}",
            "bin_count": f"model_dataset_split_bin_upper:lossd_calibration_predictions:increase{win}",
            "bin_accuracy": f"model_dataset_split_bin_upper:lossd_calibration_accuracy:ratio{win}",
            "bin_confidence": f"model_dataset_split_bin_upper:lossd_calibration_mean_confidence:ratio{win}",
            "rows_window": f"sum by (model, dataset, split) (increase(lossd_evaluated_rows_total[{win}]))",
        }
        ranged = {
            "loss": f"model_dataset_split_function:lossd_loss:mean{cur}",
            "metric": f"model_dataset_split_function:lossd_metric:mean{cur}",
            "ece": f"model_dataset_split:lossd_ece:ratio{cur}",
        }
        answers = await asyncio.gather(*(self._instant(q, now) for q in instant.values()), *(self._range(q, now) for q in ranged.values()))
        got = dict(zip([*instant, *(f"range_{k}" for k in ranged)], answers, strict=True))
        return {
            "source": "prometheus",
            "prometheus_url": self.url,
            "now": now,
            "interval_seconds": RULE_WINDOWS["current"][1],
            "history_seconds": RULE_WINDOWS["window"][1],
            "bins": self.bins,
            "bin_edges": [b / self.bins for b in range(self.bins + 1)],
            "series": _series(got, self.bins),
        }

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


def _by_key(results: Iterable[dict[str, Any]]) -> dict[Key, dict[str, float | None]]:
    """Instant vectors keyed by tags, then by function (or "" for per-tag-set rules)."""
    out: dict[Key, dict[str, float | None]] = {}
    for r in results:
        out.setdefault(_key(r["metric"]), {})[r["metric"].get("function", "")] = _float(r["value"][1])
    return out


def _bins(results: Iterable[dict[str, Any]], bins: int) -> dict[Key, list[float | None]]:
    out: dict[Key, list[float | None]] = {}
    edges = [(b + 1) / bins for b in range(bins)]
    for r in results:
        upper = float(r["metric"].get("bin_upper", "nan"))
        index = min(range(bins), key=lambda b: abs(edges[b] - upper))
        out.setdefault(_key(r["metric"]), [None] * bins)[index] = _float(r["value"][1])
    return out


def _lines(results: Iterable[dict[str, Any]]) -> dict[Key, dict[float, dict[str, float | None]]]:
    """Range vectors: tags -> time -> function -> value."""
    out: dict[Key, dict[float, dict[str, float | None]]] = {}
    for r in results:
        per_time = out.setdefault(_key(r["metric"]), {})
        for t, value in r["values"]:
            per_time.setdefault(float(t), {})[r["metric"].get("function", "")] = _float(value)
    return out


def _series(got: dict[str, list[dict[str, Any]]], bins: int) -> list[dict[str, Any]]:
    values = {name: _by_key(got[name]) for name in got if not name.startswith(("range_", "bin_"))}
    losses = {k: sorted(v) for k, v in values["loss_window"].items()}
    metrics = {k: sorted(v) for k, v in values["metric_window"].items()}
    keys = sorted(set(losses) | set(metrics) | set(values["count_window"]))
    lines = {name: _lines(got[f"range_{name}"]) for name in ("loss", "metric", "ece")}
    reliability = {name: _bins(got[f"bin_{name}"], bins) for name in ("count", "accuracy", "confidence")}
    out = []
    for key in keys:
        functions = sorted([*losses.get(key, []), *metrics.get(key, [])])
        times = sorted(set(lines["loss"].get(key, {})) | set(lines["metric"].get(key, {})) | set(lines["ece"].get(key, {})))
        points = []
        for t in times:
            merged = {**lines["loss"].get(key, {}).get(t, {}), **lines["metric"].get(key, {}).get(t, {})}
            ece = lines["ece"].get(key, {}).get(t, {}).get("")
            points.append({"t": t, "loss": {f: merged.get(f) for f in functions}, "ece": ece})

        def summary(which: str, key: Key = key, functions: list[str] = functions) -> dict[str, Any]:
            merged = {**values[f"loss_{which}"].get(key, {}), **values[f"metric_{which}"].get(key, {})}
            return {
                "loss": {f: merged.get(f) for f in functions},
                "ece": values[f"ece_{which}"].get(key, {}).get(""),
                "count": values[f"count_{which}"].get(key, {}).get("") or 0.0,
            }

        window = summary("window")
        window["rows"] = values["rows_window"].get(key, {}).get("") or 0.0
        out.append(
            {
                "model": key[0],
                "dataset": key[1],
                "split": key[2],
                "group": "",
                "functions": functions,
                "losses": losses.get(key, []),
                "metrics": metrics.get(key, []),
                "language_model": False,
                "tags": {},
                "points": points,
                "current": summary("current"),
                "progress": {"axis": None, "points": []},
                "reliability": {
                    "count": [c or 0.0 for c in reliability["count"].get(key, [0.0] * bins)],
                    "confidence": reliability["confidence"].get(key, [None] * bins),
                    "accuracy": reliability["accuracy"].get(key, [None] * bins),
                },
                "summary": window,
            }
        )
    return out
