// poolserve dashboard: polls dashboard/api/state every second and renders it. No build step.
"use strict";

const POLL_MS = 1000;
let last = null;          // the last state received
let clockOffset = 0;      // server time - browser time, seconds
let failures = 0;

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children || []) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function table(headers, rows) {
  return el("table", {}, [
    el("thead", {}, [el("tr", {}, headers.map((h) => el("th", { text: h })))]),
    el("tbody", {}, rows),
  ]);
}

function badge(state, kind) {
  return el("span", { class: "badge", [kind || "data-state"]: state, text: state });
}

function empty(text) {
  return el("p", { class: "empty", text });
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  return Number(value).toFixed(digits === undefined ? 0 : digits);
}

function short(id) {
  return id && id.length > 12 ? id.slice(0, 8) + "…" : id || "";
}

function countdown(seconds) {
  if (seconds === null || seconds === undefined) return "no lease";
  if (seconds <= 0) return "lapsed";
  const m = Math.floor(seconds / 60), s = Math.floor(seconds % 60);
  return `${m}m ${String(s).padStart(2, "0")}s`;
}

function replace(id, node) {
  const target = document.getElementById(id);
  target.replaceChildren(node);
}

function renderTotals(state) {
  const c = state.cluster, r = state.requests;
  const pools = c.pools_by_state
    ? Object.entries(c.pools_by_state).map(([k, v]) => `${v} ${k}`).join(", ") || "none"
    : "unknown";
  const kv = c.kv_blocks_used === null
    ? `${c.kv_blocks_total} total`
    : `${c.kv_blocks_used} / ${c.kv_blocks_total}`;
  const cards = [
    ["workers ready", `${c.workers_ready} / ${c.workers}`],
    ["active requests", c.active_requests],
    ["streams in flight", r.streams_in_flight],
    ["KV blocks used", kv],
    ["KV handles open", c.kv_handles_open === null ? "not reported" : c.kv_handles_open],
    ["pools", pools],
    ["requests served", r.total],
    ["disconnects / cancellations", `${r.client_disconnects} / ${r.cancellations}`],
  ];
  document.getElementById("totals").replaceChildren(
    ...cards.map(([label, value]) =>
      el("div", { class: "card", "data-total": label }, [
        el("div", { class: "value", text: value }),
        el("div", { class: "label", text: label }),
      ]))
  );
}

function perProfile(pool, profiles) {
  const names = new Set([...profiles, ...Object.keys(pool.gpus), ...Object.keys(pool.gpu_caps),
    ...Object.keys(pool.assigned)]);
  const parts = [];
  for (const p of names) {
    const want = pool.gpus[p], cap = pool.gpu_caps[p], got = pool.assigned[p] || 0;
    if (want === undefined && cap === undefined && !got) continue;
    const need = pool.default ? `base ${want === undefined ? 0 : want}`
      : `${want === undefined ? 0 : want} required`;
    parts.push(el("div", { class: "mono", "data-profile": p },
      [`${p}: ${got} assigned / ${need}` + (cap === undefined ? "" : ` (cap ${cap})`)]));
  }
  return parts.length ? parts : [el("span", { class: "muted", text: "any profile" })];
}

function renderPools(state) {
  if (state.pools === null) {
    replace("pools", empty("Pools unavailable: " + (state.problems.pools || "unknown error")));
    return;
  }
  const pools = state.pools;
  const rows = pools.map((p) => el("tr", { "data-pool": p.name, "data-state": p.state }, [
    el("td", {}, [el("strong", { text: p.name }),
      p.default ? el("div", { class: "muted", text: "base capacity" }) : null]),
    el("td", {}, [badge(p.state)]),
    el("td", { class: "num lease", "data-expires-at": p.expires_at },
      [countdown(p.expires_at === null ? null : p.expires_at - (Date.now() / 1000 + clockOffset))]),
    el("td", {}, perProfile(p, state.profiles)),
    el("td", { class: "num", text: p.minimum_worker_count }),
    el("td", { class: "mono", text: p.pinned_models.join(", ") || "–" }),
    el("td", { class: "muted", text: p.readiness || "" }),
  ]));
  const node = table(["pool", "state", "lease", "workers per profile", "floor",
    "pinned models", "readiness"], rows);
  const custom = pools.filter((p) => !p.default).length;
  replace("pools", custom ? node : el("div", {}, [node,
    empty("No pools yet: create one with POST /v1/pools (or SIEClient.create_pool).")]));
}

function renderUsage(state) {
  if (state.usage === null || state.usage === undefined) {
    replace("usage", empty("Usage unavailable: " + (state.problems.usage || "unknown error")));
    return;
  }
  const limit = (v) => (v === null || v === undefined ? "–" : String(v));
  const rows = state.usage.map((u) => el("tr", { "data-usage-pool": u.pool }, [
    el("td", {}, [el("strong", { text: u.pool }),
      u.shared ? el("div", { class: "muted", text: "shared" }) : null]),
    el("td", { class: "num", "data-field": "requests", text: u.requests }),
    el("td", { class: "num", "data-field": "prompt_tokens", text: u.prompt_tokens }),
    el("td", { class: "num", "data-field": "cached_prompt_tokens", text: u.cached_prompt_tokens }),
    el("td", { class: "num", "data-field": "completion_tokens", text: u.completion_tokens }),
    el("td", { class: "num", "data-field": "worker_seconds", text: u.worker_seconds.toFixed(0) }),
    el("td", { class: "mono", text: `${limit(u.limits.requests_per_minute)} / ` +
      `${limit(u.limits.tokens_per_minute)} / ${limit(u.limits.concurrent_streams)}` }),
    el("td", { class: "num", text: u.priority }),
    el("td", { class: "mono", text: u.top_keys.map(([k, t]) => `${k} ${t}`).join(", ") || "–" }),
  ]));
  replace("usage", table(["pool", "requests", "prompt tokens", "cached", "completion tokens",
    "worker-s", "limits rpm / tpm / streams", "priority", "top keys (tokens)"], rows));
}

function kvBar(kv) {
  const total = kv.blocks_total || 0;
  const used = kv.blocks_used === null ? Math.round(total * kv.engine_usage) : kv.blocks_used;
  const pct = total ? Math.min(100, (100 * used) / total) : 0;
  const label = total ? `${used} / ${total} blocks` : "no KV reported";
  const engine = kv.blocks_used === null ? "" : ` · engine ${fmt(kv.engine_usage * 100, 1)}%`;
  // routing.kv_events: the blocks the engine's prefix cache holds, from its KV events
  const cached = kv.cached_blocks === null || kv.cached_blocks === undefined
    ? "" : ` · ${kv.cached_blocks} cached`;
  return el("div", { class: "kv", "data-kv-used": used, "data-kv-total": total }, [
    el("div", { class: "kv-bar", title: label }, [
      el("div", { class: "kv-fill", style: `width: ${Math.max(pct, used > 0 ? 1 : 0)}%` }),
    ]),
    el("span", { class: "kv-text", text: label + engine + cached }),
  ]);
}

function renderWorkers(state) {
  if (!state.workers.length) {
    replace("workers", empty("No workers have reported yet (starting, scaled to zero, or " +
      "the autoscaler is unreachable)."));
    return;
  }
  const rows = state.workers.map((w) => el("tr", { "data-worker": w.name, "data-state": w.state }, [
    el("td", { class: "mono", title: w.name, text: short(w.name) }),
    el("td", { text: w.profile }),
    el("td", { class: "mono", title: w.node_id, text: short(w.node_id) }),
    el("td", { text: w.pool }),
    el("td", {}, w.models.map((m) => el("div", { class: "mono", title: m.error || "" },
      [`${m.model} `, badge(m.state === "loaded" ? "ready" : m.state)]))),
    el("td", {}, [badge(w.state)]),
    el("td", { class: "num queue", text: w.queue_depth }),
    el("td", {}, [kvBar(w.kv)]),
    el("td", { class: "num handles",
      text: w.kv.handles_open === null ? "–" : w.kv.handles_open }),
  ]));
  replace("workers", table(["worker", "profile", "node", "pool", "models", "health",
    "queue", "KV blocks", "KV handles"], rows));
}

function sparkline(points, series, unit) {
  const width = 260, height = 70;
  const values = points.flatMap((p) => series.map((s) => p[s.key]).filter((v) => v !== null));
  const max = Math.max(1e-9, ...values);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  for (const s of series) {
    let d = "";
    points.forEach((p, i) => {
      const v = p[s.key];
      if (v === null) return;
      const x = (i / Math.max(1, points.length - 1)) * width;
      const y = height - 4 - (v / max) * (height - 8);
      d += `${d ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
      const dot = document.createElementNS(ns, "circle");
      dot.setAttribute("cx", x.toFixed(1));
      dot.setAttribute("cy", y.toFixed(1));
      dot.setAttribute("r", "2.5");
      dot.setAttribute("fill", s.color);
      svg.append(dot);
    });
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", d);
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", s.color);
    path.setAttribute("stroke-width", "2");
    svg.append(path);
  }
  const top = document.createElementNS(ns, "text");
  top.setAttribute("x", "2"); top.setAttribute("y", "10");
  top.setAttribute("font-size", "9"); top.setAttribute("fill", "#6b7280");
  top.textContent = values.length ? `${fmt(max, max < 10 ? 1 : 0)} ${unit}` : "no traffic yet";
  svg.append(top);
  return svg;
}

function chart(title, points, series, unit, now) {
  return el("div", { class: "chart", "data-chart": title }, [
    el("div", { class: "title" }, [
      el("span", { text: title }),
      el("span", { class: "legend" }, series.map((s) =>
        el("span", { style: `color: ${s.color}`, text: `${s.label} ${now(s)}` }))),
    ]),
    sparkline(points, series, unit),
  ]);
}

function renderLatency(state) {
  const L = state.latency, points = state.series.points;
  const live = (state.requests.ingress_replicas || {}).live;
  document.getElementById("latency-span").textContent =
    `last ${Math.round(L.span_s / 60)} min · ${L.requests} requests · ` +
    `${state.series.step_s} s buckets` + (live ? ` · ${live} ingress replicas` : "");
  if (!L.requests) {
    replace("latency", empty("No finished generations in the last few minutes."));
    return;
  }
  replace("latency", el("div", { class: "charts" }, [
    chart("TTFT (ingress)", points, [
      { key: "ttft_p50_ms", label: "p50", color: "#2b6cb0" },
      { key: "ttft_p99_ms", label: "p99", color: "#c53030" }], "ms",
      (s) => fmt(L[s.key], 1) + " ms"),
    chart("TPOT (ingress)", points, [
      { key: "tpot_p50_ms", label: "p50", color: "#2b6cb0" },
      { key: "tpot_p99_ms", label: "p99", color: "#c53030" }], "ms",
      (s) => fmt(L[s.key], 1) + " ms"),
    chart("tokens/s", points, [{ key: "tokens_per_s", label: "last 15 s", color: "#1f9d55" }], "tok/s",
      () => fmt(points.length ? points[points.length - 1].tokens_per_s : null, 1)),
    el("div", { class: "chart" }, [
      el("div", { class: "title", text: "engine-reported (same requests)" }),
      el("div", { class: "mono", text: `TTFT p50 ${fmt(L.engine_ttft_p50_ms, 1)} ms · ` +
        `p99 ${fmt(L.engine_ttft_p99_ms, 1)} ms` }),
      el("div", { class: "mono", text: `TPOT p50 ${fmt(L.engine_tpot_p50_ms, 1)} ms · ` +
        `p99 ${fmt(L.engine_tpot_p99_ms, 1)} ms` }),
      el("div", { class: "muted", text: "ingress minus engine = routing, Ray transport, queue" }),
    ]),
  ]));
}

function renderTargets(state) {
  const rows = state.targets || [];
  if (!rows.length) {
    replace("targets", empty("No generations in the last few minutes."));
    return;
  }
  replace("targets", table(["pool", "model", "requests", "errors", "TTFT p50", "TTFT p99",
    "TPOT p50", "TPOT p99", "tokens"], rows.map((t) =>
    el("tr", { "data-pool": t.pool, "data-model": t.model }, [
      el("td", { text: t.pool || "–" }),
      el("td", { class: "mono", text: t.model }),
      el("td", { class: "num", text: t.requests }),
      el("td", { class: "num", text: t.errors }),
      el("td", { class: "num", text: fmt(t.ttft_p50_ms, 1) + " ms" }),
      el("td", { class: "num", text: fmt(t.ttft_p99_ms, 1) + " ms" }),
      el("td", { class: "num", text: fmt(t.tpot_p50_ms, 1) + " ms" }),
      el("td", { class: "num", text: fmt(t.tpot_p99_ms, 1) + " ms" }),
      el("td", { class: "num", text: t.tokens }),
    ]))));
}

function renderDecisions(state) {
  const a = state.autoscaler;
  if (a === null) {
    replace("decisions", empty("Autoscaler unavailable: " +
      (state.problems.autoscaler || "unknown error")));
    return;
  }
  const time = (at) => new Date(at * 1000).toLocaleTimeString();
  const items = a.decisions.map((d) => el("li", { "data-kind": d.kind }, [
    el("span", { class: "muted", text: time(d.at) + " " }),
    el("span", { class: "kind", text: d.kind }),
    d.reason,
    d.repeats > 1
      ? el("span", { class: "muted", text: ` ×${d.repeats} since ${time(d.first_at)}` }) : null,
  ]));
  const targets = Object.entries(a.replicas).map(([p, n]) => `${p}: ${n}`).join(", ");
  replace("decisions", el("div", {}, [
    el("div", { class: "muted", text: `replica targets ${targets || "none"}` +
      (a.scaler_error ? ` · scaler error: ${a.scaler_error}` : "") }),
    items.length ? el("ul", { class: "decisions" }, items)
      : empty("No decisions yet: nothing has changed since the autoscaler started."),
  ]));
}

function renderErrors(state) {
  const r = state.requests;
  const codes = Object.keys(r.errors_by_code);
  if (!codes.length) {
    replace("errors", empty(`No errors since counting began (${r.total} requests).`));
    return;
  }
  replace("errors", table(["code", "total", `last ${r.recent_span_s / 60} min`],
    codes.map((code) => el("tr", { "data-code": code }, [
      el("td", { class: "mono", text: code }),
      el("td", { class: "num", text: r.errors_by_code[code] }),
      el("td", { class: "num", text: r.recent_errors_by_code[code] || 0 }),
    ]))));
}

function render(state) {
  const status = document.getElementById("status");
  status.textContent = state.status.replace("_", " ");
  status.dataset.status = state.status;
  document.getElementById("updated").textContent =
    "updated " + new Date(state.now * 1000).toLocaleTimeString();
  const problems = Object.entries(state.problems || {});
  const banner = document.getElementById("banner");
  banner.hidden = !problems.length;
  banner.textContent = problems.map(([k, v]) => `${k}: ${v}`).join(" · ");
  for (const part of [renderTotals, renderPools, renderUsage, renderWorkers, renderLatency,
    renderTargets, renderDecisions, renderErrors]) {
    try { part(state); } catch (error) { console.error(part.name, error); }
  }
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function tickLeases() {
  for (const cell of document.querySelectorAll("td.lease[data-expires-at]")) {
    const at = Number(cell.dataset.expiresAt);
    cell.textContent = countdown(at - (Date.now() / 1000 + clockOffset));
  }
}

async function poll() {
  try {
    const response = await fetch("dashboard/api/state", { cache: "no-store" });
    if (response.status === 401) {  // the sign-in expired or its key was revoked
      window.location.reload();  // the page answers with its sign-in form
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    last = await response.json();
    clockOffset = last.now - Date.now() / 1000;
    failures = 0;
    render(last);
  } catch (error) {
    failures += 1;
    const status = document.getElementById("status");
    status.textContent = "unreachable";
    status.dataset.status = "unreachable";
    const banner = document.getElementById("banner");
    banner.hidden = false;
    banner.textContent = `Cannot reach the service (${error.message}); retrying. ` +
      (last ? "Showing the last data received." : "");
  } finally {
    setTimeout(poll, failures ? Math.min(10000, POLL_MS * 2 ** failures) : POLL_MS);
  }
}

setInterval(tickLeases, 1000);
poll();
