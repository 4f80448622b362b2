// lossd dashboard: polls v1/history and draws loss, ECE and reliability charts as inline SVG.
// No dependencies and no network beyond this server. ?refresh=SECONDS sets the poll period.
(() => {
  "use strict";

  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#7aa2f7", "#f7768e", "#9ece6a", "#e0af68", "#bb9af7", "#2ac3de", "#ff9e64", "#c0caf5"];
  const ECE_COLOR = "#bb9af7";
  const query = new URLSearchParams(location.search);
  const REFRESH_MS = Math.max(0.5, Number(query.get("refresh")) || 2) * 1000;
  const H = 240, HIST = 34, M = { top: 12, right: 16, bottom: 30, left: 52 };
  let W = 560; // set to each chart's measured width before drawing it, so text stays at 1:1

  const $ = (id) => document.getElementById(id);
  const cards = new Map(); // series key -> card element
  let latest = null;

  // -- small helpers ----------------------------------------------------------

  function svgEl(tag, attrs, parent) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  function htmlEl(tag, cls, parent, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function fmt(v, digits = 4) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return Number(v.toPrecision(digits)).toString();
  }

  function fmtCount(v) {
    if (!Number.isFinite(v)) return "–";
    if (v >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (v >= 1e4) return (v / 1e3).toFixed(1) + "k";
    return Math.round(v).toString();
  }

  function fmtTime(t) {
    const d = new Date(t * 1000);
    return d.toTimeString().slice(0, 8);
  }

  function fmtAgo(seconds) {
    if (seconds < 2) return "just now";
    if (seconds < 90) return `${Math.round(seconds)} s ago`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
    return `${(seconds / 3600).toFixed(1)} h ago`;
  }

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const span = hi - lo;
    const step0 = Math.pow(10, Math.floor(Math.log10(span / count)));
    const err = (count * step0) / span;
    const step = step0 * (err <= 0.15 ? 10 : err <= 0.35 ? 5 : err <= 0.75 ? 2 : 1);
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
    return ticks;
  }

  function timeTicks(t0, t1, count) {
    const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];
    const step = steps.find((s) => (t1 - t0) / s <= count) || 86400;
    const out = [];
    for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) out.push(t);
    return out;
  }

  function ratingClass(ece) {
    if (ece === null || ece === undefined) return "";
    return ece < 0.05 ? "ece-good" : ece < 0.15 ? "ece-warn" : "ece-bad";
  }

  function keyOf(s) { return JSON.stringify([s.model, s.dataset, s.split, s.group || ""]); }
  function shown(v) { return v === "" ? "(unset)" : v; }
  function untagged(s) { return !s.model && !s.dataset && !s.split; }
  // exp(token-mean NLL): perplexity from lm_cross_entropy's mean (token normalization, no smoothing by default).
  function perplexity(values) {
    const nll = values && values.lm_cross_entropy;
    return nll === null || nll === undefined ? null : Math.exp(nll);
  }

  // -- charts -----------------------------------------------------------------

  function frame(kind, height = H) {
    return svgEl("svg", { viewBox: `0 0 ${W} ${height}`, width: W, height, role: "img", "data-chart": kind, "data-points": "0" });
  }

  // Draw with the width the chart's box has now (cards are attached before their charts are drawn).
  function measured(box, draw) {
    W = Math.max(200, Math.floor(box.clientWidth - 20));
    box.appendChild(draw());
  }

  function axes(svg, x, y, xTicks, yTicks, xFormat, yFormat, bottom) {
    const grid = svgEl("g", { class: "grid" }, svg);
    const labels = svgEl("g", { class: "axis" }, svg);
    for (const v of yTicks) {
      svgEl("line", { x1: M.left, x2: W - M.right, y1: y(v), y2: y(v) }, grid);
      svgEl("text", { x: M.left - 8, y: y(v) + 4, "text-anchor": "end" }, labels).textContent = yFormat(v);
    }
    for (const t of xTicks) {
      svgEl("text", { x: x(t), y: bottom + 17, "text-anchor": "middle" }, labels).textContent = xFormat(t);
    }
    svgEl("line", { x1: M.left, x2: W - M.right, y1: bottom, y2: bottom }, labels);
  }

  function noData(svg, text) {
    svgEl("text", { class: "nodata", x: W / 2, y: (H + HIST) / 2, "text-anchor": "middle" }, svg).textContent = text;
  }

  // series: [{name, color, points: [[t, v|null], ...]}]; domain: [t0, t1]
  // Points further apart than opts.gap seconds are not joined: an interval without evaluations is a gap.
  function lineChart(kind, series, domain, opts = {}) {
    const svg = frame(kind, H + HIST);
    const values = series.flatMap((s) => s.points.map((p) => p[1]).filter((v) => v !== null && Number.isFinite(v)));
    if (!values.length) { noData(svg, opts.empty || "no data in this window"); return svg; }
    let lo = Math.min(...values), hi = Math.max(...values);
    if (opts.zero) lo = Math.min(0, lo);
    const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 0.1;
    lo = opts.zero && lo >= 0 ? 0 : lo - pad;
    hi += pad;
    if (opts.unit) { lo = 0; hi = 1; } // metrics: accuracy-like, on their own fixed 0-1 axis
    const yTicks = opts.unit ? [0, 0.25, 0.5, 0.75, 1] : niceTicks(lo, hi, 5);
    lo = Math.min(lo, yTicks[0]); hi = Math.max(hi, yTicks[yTicks.length - 1]);
    let [t0, t1] = domain;
    if (!(t1 > t0)) t1 = t0 + 1;
    const x = (t) => M.left + ((t - t0) / (t1 - t0)) * (W - M.left - M.right);
    const bottom = H + HIST - M.bottom;
    const y = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - M.top);
    const byTime = !opts.axis || opts.axis === "time";
    const xTicks = byTime ? timeTicks(t0, t1, W < 400 ? 3 : 5) : niceTicks(t0, t1, W < 400 ? 3 : 5).filter((v) => v >= t0 && v <= t1);
    axes(svg, x, y, xTicks, yTicks, byTime ? fmtTime : (v) => fmt(v, 6), (v) => fmt(v, 3), bottom);
    svg.setAttribute("data-axis", opts.axis || "time");
    let plotted = 0;
    for (const s of series) {
      const runs = [];
      let run = [];
      for (const [t, v] of s.points) {
        const broken = run.length && opts.gap && t - run[run.length - 1][2] > opts.gap;
        if (broken || v === null || !Number.isFinite(v)) { if (run.length) runs.push(run); run = []; }
        if (v !== null && Number.isFinite(v)) run.push([x(t), y(v), t, v]);
      }
      if (run.length) runs.push(run);
      for (const r of runs) {
        const d = r.map((p, i) => `${i ? "L" : "M"}${p[0].toFixed(1)},${p[1].toFixed(1)}`).join("");
        if (opts.area) {
          svgEl("path", { class: "area", fill: s.color, d: `${d}L${r[r.length - 1][0].toFixed(1)},${bottom}L${r[0][0].toFixed(1)},${bottom}Z` }, svg);
        }
        svgEl("path", { class: "line", stroke: s.color, d, "data-series": s.name }, svg);
        if (s.points.length <= 90) {
          for (const p of r) {
            const dot = svgEl("circle", { class: "dot", cx: p[0].toFixed(1), cy: p[1].toFixed(1), r: 3, fill: s.color }, svg);
            svgEl("title", {}, dot).textContent = `${s.name} ${fmt(p[3], 6)} at ${byTime ? fmtTime(p[2]) : `${opts.axis} ${fmt(p[2], 6)}`}`;
          }
        }
        plotted += r.length;
      }
    }
    svg.setAttribute("data-points", String(plotted));
    return svg;
  }

  function reliabilityChart(rel, bins) {
    const height = H + HIST; // the plot, then the strip of sample counts
    const svg = frame("reliability", height);
    const total = rel.count.reduce((a, b) => a + b, 0);
    if (!total) { noData(svg, "send class scores and labels"); return svg; }
    const bottom = H - M.bottom;
    const x = (v) => M.left + v * (W - M.left - M.right);
    const y = (v) => bottom - v * (bottom - M.top);
    const grid = svgEl("g", { class: "grid" }, svg);
    const labels = svgEl("g", { class: "axis" }, svg);
    for (const v of [0, 0.25, 0.5, 0.75, 1]) {
      svgEl("line", { x1: x(0), x2: x(1), y1: y(v), y2: y(v) }, grid);
      svgEl("text", { x: x(0) - 8, y: y(v) + 4, "text-anchor": "end" }, labels).textContent = v.toFixed(2);
    }
    for (const v of [0, 0.2, 0.4, 0.6, 0.8, 1]) {
      svgEl("text", { x: x(v), y: bottom + 16, "text-anchor": "middle" }, labels).textContent = v.toFixed(1);
    }
    svgEl("text", { x: 12, y: (M.top + bottom) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(M.top + bottom) / 2})` }, labels).textContent = "accuracy";
    svgEl("text", { x: 4, y: height - 18, "text-anchor": "start" }, labels).textContent = "samples";
    svgEl("text", { x: (x(0) + x(1)) / 2, y: height - 2, "text-anchor": "middle" }, labels).textContent = "top-1 confidence";
    const maxCount = Math.max(...rel.count);
    let plotted = 0;
    for (let b = 0; b < bins; b++) {
      const n = rel.count[b];
      const x0 = x(b / bins) + 1.5, x1 = x((b + 1) / bins) - 1.5;
      if (n > 0) {
        const h = Math.max(1, (n / maxCount) * (HIST - 16));
        const hist = svgEl("rect", { class: "hist", x: x0, y: height - 16 - h, width: x1 - x0, height: h }, svg);
        svgEl("title", {}, hist).textContent = `${fmtCount(n)} samples`;
      }
      const acc = rel.accuracy[b], conf = rel.confidence[b];
      if (acc === null || conf === null) continue;
      const bar = svgEl("rect", { class: "bar", x: x0, y: y(acc), width: x1 - x0, height: Math.max(0, bottom - y(acc)) }, svg);
      svgEl("title", {}, bar).textContent = `bin (${fmt(b / bins, 3)}, ${fmt((b + 1) / bins, 3)}]: accuracy ${fmt(acc)}, confidence ${fmt(conf)}, ${fmtCount(n)} samples`;
      svgEl("rect", { class: conf > acc ? "gap-over" : "gap-under", x: x0, y: y(Math.max(acc, conf)), width: x1 - x0, height: Math.abs(y(acc) - y(conf)) }, svg);
      plotted += 1;
    }
    svgEl("path", { class: "diag", d: `M${x(0)},${y(0)}L${x(1)},${y(1)}` }, svg);
    svg.setAttribute("data-points", String(plotted));
    return svg;
  }

  function legend(parent, items) {
    const box = htmlEl("div", "legend", parent);
    for (const { name, color } of items) {
      const item = htmlEl("span", "", box);
      const swatch = htmlEl("i", "", item);
      swatch.style.background = color;
      item.appendChild(document.createTextNode(name));
    }
  }

  // -- cards --------------------------------------------------------------------

  function card(s) {
    const key = keyOf(s);
    let node = cards.get(key);
    if (!node) {
      node = htmlEl("article", "card");
      node.dataset.key = key;
      node.dataset.search = `${s.model} ${s.dataset} ${s.split}`.toLowerCase();
      cards.set(key, node);
    }
    return node;
  }

  function renderTitle(head, s) {
    const title = htmlEl("div", "card-title", head);
    if (untagged(s)) {
      title.append("untagged");
      htmlEl("span", "sep", title, "·");
      title.append(s.group ? s.group.split("+").join(", ") : "no functions");
    } else {
      title.append(shown(s.model));
      htmlEl("span", "sep", title, "·");
      title.append(shown(s.dataset));
      htmlEl("span", "sep", title, "·");
      title.append(shown(s.split));
    }
    if (s.language_model) htmlEl("span", "chip", title, "LM · token-level");
    for (const [k, v] of Object.entries(s.tags || {})) htmlEl("span", "chip tag", title, `${k} ${v}`);
  }

  // One row of numbers: "now" (the last interval) or "window" (the whole history window), each labelled.
  function statsRow(parent, label, cls, values, s, extra) {
    const row = htmlEl("div", `stats ${cls}`, parent);
    htmlEl("span", "when", row, label);
    const add = (name, value, vcls) => { const e = htmlEl("span", "", row, `${name} `); htmlEl("b", vcls || "", e, value); };
    for (const fn of s.functions) add(fn, fmt(values.loss ? values.loss[fn] : null));
    const ppl = perplexity(values.loss);
    if (ppl !== null) add("perplexity", fmt(ppl));
    add(s.language_model ? "token ECE" : "ECE", fmt(values.ece), ratingClass(values.ece));
    add(s.language_model ? "tokens" : "samples", fmtCount(values.count || values.rows || 0));
    for (const [k, v] of extra) add(k, v);
  }

  function renderCard(node, s, data) {
    node.replaceChildren();
    node.dataset.search = `${s.model} ${s.dataset} ${s.split} ${s.group || ""}`.toLowerCase();
    const head = htmlEl("div", "card-head", node);
    renderTitle(head, s);
    const numbers = htmlEl("div", "numbers", head);
    const cur = s.current || {};
    statsRow(numbers, `now (last ${fmt(data.interval_seconds, 3)} s)`, "current", cur, s, []);
    statsRow(numbers, `window (${fmt(data.history_seconds / 60, 3)} min)`, "window", s.summary, s, [
      ["evaluations", fmtCount(s.summary.evaluations || 0)],
      ...(s.summary.last_seen ? [["last", fmtAgo(data.now - s.summary.last_seen)]] : []),
    ]);

    const charts = htmlEl("div", "charts", node);
    const progress = s.progress && s.progress.axis ? s.progress : null;
    const half = progress ? 0 : data.interval_seconds / 2;
    const pts = progress ? progress.points.map((p) => ({ ...p, t: p.x })) : s.points;
    let t0, t1;
    if (progress) {
      t0 = pts.length ? pts[0].t : 0;
      t1 = pts.length ? pts[pts.length - 1].t : 1;
    } else {
      t1 = Math.max(data.now, pts.length ? pts[pts.length - 1].t + data.interval_seconds : data.now);
      t0 = Math.min(pts.length ? pts[0].t : t1, t1 - 12 * data.interval_seconds);
    }
    const axis = progress ? progress.axis : "time";
    const by = progress ? `by ${axis}` : "per interval";
    const gap = progress ? 0 : 1.5 * data.interval_seconds;
    const colors = new Map(s.functions.map((fn, i) => [fn, PALETTE[i % PALETTE.length]]));
    const line = (fn) => ({ name: fn, color: colors.get(fn), points: pts.map((p) => [p.t + half, p.loss[fn]]) });
    const losses = s.losses || s.functions;
    const metrics = s.metrics || [];

    const loss = htmlEl("div", "chart", charts);
    htmlEl("h3", "", loss, `mean loss ${by}`);
    legend(loss, losses.map((fn) => ({ name: fn, color: colors.get(fn) })));
    measured(loss, () => lineChart("loss", losses.map(line), [t0, t1], { gap, axis, empty: "no loss with a mean yet" }));

    if (metrics.length) {
      const metric = htmlEl("div", "chart", charts);
      htmlEl("h3", "", metric, `metrics ${by} (0–1)`);
      legend(metric, metrics.map((fn) => ({ name: fn, color: colors.get(fn) })));
      measured(metric, () => lineChart("metric", metrics.map(line), [t0, t1], { gap, axis, unit: true }));
    }

    if (perplexity(s.summary.loss) !== null) {
      const ppl = htmlEl("div", "chart", charts);
      htmlEl("h3", "", ppl, `perplexity ${by}`);
      legend(ppl, [{ name: "exp(lm_cross_entropy)", color: PALETTE[3] }]);
      const points = pts.map((p) => [p.t + half, perplexity(p.loss)]);
      measured(ppl, () => lineChart("perplexity", [{ name: "perplexity", color: PALETTE[3], points }], [t0, t1], { gap, axis }));
    }

    const level = s.language_model ? "token-level " : "";
    const ece = htmlEl("div", "chart", charts);
    htmlEl("h3", "", ece, `${level}calibration error ${by} (${data.bins} bins)`);
    legend(ece, [{ name: "top-1 ECE", color: ECE_COLOR }]);
    measured(ece, () => lineChart("ece", [{ name: "ECE", color: ECE_COLOR, points: pts.map((p) => [p.t + half, p.ece]) }], [t0, t1], { zero: true, area: true, gap, axis, empty: "send class scores and labels" }));

    const rel = htmlEl("div", "chart", charts);
    htmlEl("h3", "", rel, `${level}reliability (window)`);
    legend(rel, [{ name: "accuracy", color: "#7aa2f7" }, { name: "over-confident", color: "#f7768e" }, { name: "under-confident", color: "#e0af68" }]);
    measured(rel, () => reliabilityChart(s.reliability, data.bins));
  }

  function renderOverview(data) {
    const box = $("overview");
    box.hidden = !data.series.length;
    box.replaceChildren();
    const kpi = (label, value, cls) => {
      const k = htmlEl("div", "kpi", box);
      htmlEl("div", "label", k, label);
      htmlEl("div", `value ${cls || ""}`, k, value);
    };
    const sum = (f) => data.series.reduce((a, s) => a + f(s), 0);
    const worst = data.series.filter((s) => s.summary.ece !== null).sort((a, b) => b.summary.ece - a.summary.ece)[0];
    kpi("series", String(data.series.length));
    kpi("evaluations", fmtCount(sum((s) => s.summary.evaluations)));
    kpi("samples (window)", fmtCount(sum((s) => s.summary.rows || 0)));
    kpi("worst ECE (window)", worst ? `${fmt(worst.summary.ece, 3)}` : "–", worst ? ratingClass(worst.summary.ece) : "");
    if (worst) box.lastChild.title = `${worst.model} · ${worst.dataset} · ${worst.split}`;
  }

  function render(data) {
    latest = data;
    renderOverview(data);
    $("empty").hidden = data.series.length > 0;
    const list = $("series");
    const filter = $("filter").value.trim().toLowerCase();
    const nodes = data.series.map(card);
    list.replaceChildren(...nodes); // attached first: charts are drawn at their measured width
    data.series.forEach((s, i) => {
      nodes[i].hidden = Boolean(filter) && !nodes[i].dataset.search.includes(filter);
      if (!nodes[i].hidden) renderCard(nodes[i], s, data);
    });
    const minutes = data.history_seconds / 60;
    const source = data.source === "prometheus" ? "fleet (Prometheus)" : "this replica";
    $("source").textContent = `${source} history`;
    $("window").textContent = `window ${minutes >= 1 ? fmt(minutes, 3) + " min" : data.history_seconds + " s"} · ${fmt(data.interval_seconds, 3)} s intervals · ${data.bins} calibration bins`;
  }

  function setStatus(state, text) {
    $("status").dataset.state = state;
    $("status-text").textContent = text;
  }

  async function poll() {
    try {
      const response = await fetch("v1/history", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
      setStatus("live", `live · ${new Date().toTimeString().slice(0, 8)}`);
      document.body.dataset.loaded = "true";
    } catch (err) {
      setStatus("error", `cannot reach the service (${err.message})`);
    } finally {
      setTimeout(poll, REFRESH_MS);
    }
  }

  let resizing = null;
  $("filter").addEventListener("input", () => { if (latest) render(latest); });
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { if (latest) render(latest); }, 150);
  });
  poll();
})();
