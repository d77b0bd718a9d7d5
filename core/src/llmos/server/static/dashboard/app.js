// The llmos dashboard: polls the daemon's monitoring routes every two seconds
// and draws them. Plain JavaScript, no dependencies; see dashboard.py.

import { clock, drawChart } from "./charts.js";

const POLL_MS = 2000;
const TIMEOUT_MS = 8000;
const KEY = "llmos.apiKey";
const MAX_JOBS = 6;

const $ = (selector) => document.querySelector(selector);

const state = {
  window: 300,
  model: "",
  bucket: null,
  keep: null,
  timer: null,
  busy: false, // a poll is in flight
  again: false, // poll again as soon as it ends (the controls changed)
  lastOk: null, // when the daemon last answered (ms)
  downSince: null,
  keyAsked: false,
  data: null, // what was last drawn, to redraw on resize
};

// --------------------------------------------------------------------------
// Numbers
// --------------------------------------------------------------------------

const DASH = "–";

function fmtMs(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return DASH;
  if (v < 1) return `${v.toFixed(2)} ms`;
  if (v < 100) return `${v.toFixed(1)} ms`;
  if (v < 10000) return `${Math.round(v)} ms`;
  return `${(v / 1000).toFixed(1)} s`;
}

function fmtRate(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return DASH;
  if (v === 0) return "0";
  if (v < 10) return v.toFixed(2);
  if (v < 100) return v.toFixed(1);
  return Math.round(v).toLocaleString("en");
}

function fmtInt(v) {
  return v === null || v === undefined ? DASH : Math.round(v).toLocaleString("en");
}

function fmtPct(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return DASH;
  const p = v * 100;
  return `${p === 0 ? "0" : p < 1 ? p.toFixed(2) : p.toFixed(1)} %`;
}

function fmtNumber(v) {
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString("en");
  return Math.abs(v) < 1 ? v.toFixed(4).replace(/0+$/, "") : v.toFixed(2);
}

function fmtEvidence(v) {
  if (Array.isArray(v)) return v.map(fmtEvidence).join(", ");
  if (v && typeof v === "object") {
    return Object.entries(v).map(([k, x]) => `${k} ${fmtEvidence(x)}`).join(", ");
  }
  return v === null || v === undefined ? DASH : fmtNumber(v);
}

function fmtWindow(seconds) {
  if (seconds >= 3600) return `${+(seconds / 3600).toFixed(1)} h`;
  if (seconds >= 60) return `${+(seconds / 60).toFixed(1)} min`;
  return `${Math.round(seconds)} s`;
}

function fmtAgo(epochSeconds) {
  if (!epochSeconds) return "";
  const s = Math.max(Date.now() / 1000 - epochSeconds, 0);
  return `${fmtWindow(s)} ago`;
}

// --------------------------------------------------------------------------
// Talking to the daemon
// --------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status; // 0: no answer at all
  }
}

async function api(path) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  let response;
  try {
    response = await fetch(path, { headers, cache: "no-store", signal: abort.signal });
  } catch (error) {
    throw new ApiError(0, "the daemon did not answer");
  } finally {
    clearTimeout(timer);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error && body.error.message;
    throw new ApiError(response.status, message || `HTTP ${response.status}`);
  }
  return body;
}

// --------------------------------------------------------------------------
// Small DOM helpers (no innerHTML with data: text goes in as text)
// --------------------------------------------------------------------------

function h(name, attrs = {}, ...children) {
  const node = document.createElement(name);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function badge(severity, text) {
  return h("span", { class: `badge ${severity}`, text: text || severity });
}

function show(node, visible) {
  node.hidden = !visible;
}

// --------------------------------------------------------------------------
// Status, key
// --------------------------------------------------------------------------

function setStatus(kind, text) {
  const status = $("#status");
  status.dataset.state = kind;
  $("#status-text").textContent = text;
  document.body.classList.toggle("stale", kind === "down" || kind === "auth");
}

function askForKey(message) {
  const panel = $("#key-panel");
  const stored = sessionStorage.getItem(KEY);
  $("#key-message").textContent = stored
    ? `The daemon refused the key kept in this tab (${message}). Paste another one.`
    : "This daemon asks for an API key (it listens beyond this machine, or keys are " +
      "configured): paste one to see its figures.";
  if (panel.hidden) {
    panel.hidden = false;
    $("#key-toggle").setAttribute("aria-expanded", "true");
    if (!state.keyAsked) $("#key-input").focus();
  }
  state.keyAsked = true;
}

function setupKey() {
  const panel = $("#key-panel");
  $("#key-toggle").addEventListener("click", () => {
    panel.hidden = !panel.hidden;
    $("#key-toggle").setAttribute("aria-expanded", String(!panel.hidden));
    if (!panel.hidden) {
      if (!sessionStorage.getItem(KEY)) {
        $("#key-message").textContent = "Paste the daemon's API key, if it asks for one.";
      }
      $("#key-input").focus();
    }
  });
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("#key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("#key-input").value = "";
    panel.hidden = true;
    $("#key-toggle").setAttribute("aria-expanded", "false");
    state.keyAsked = false;
    pollNow();
  });
  $("#key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    $("#key-input").value = "";
    pollNow();
  });
}

// --------------------------------------------------------------------------
// Controls (kept in the address's #fragment so a reload keeps them)
// --------------------------------------------------------------------------

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const w = Number(params.get("window"));
  if ([300, 900, 3600].includes(w)) state.window = w;
  state.model = params.get("model") || "";
}

function writeHash() {
  const params = new URLSearchParams();
  params.set("window", String(state.window));
  if (state.model) params.set("model", state.model);
  history.replaceState(null, "", `#${params}`);
}

function selectModel(name) {
  state.model = name;
  syncModelSelect(state.data ? Object.keys(state.data.summary.models) : []);
  writeHash();
  pollNow();
}

function syncModelSelect(models) {
  const select = $("#model");
  const names = [...new Set([...models, ...(state.model ? [state.model] : [])])].sort();
  const have = [...select.options].slice(1).map((o) => o.value);
  if (have.join("\n") !== names.join("\n")) {
    select.replaceChildren(h("option", { value: "", text: "all models" }));
    for (const name of names) select.append(h("option", { value: name, text: name }));
  }
  select.value = state.model;
}

function setupControls() {
  readHash();
  $("#window").value = String(state.window);
  syncModelSelect([]);
  $("#window").addEventListener("change", (event) => {
    state.window = Number(event.target.value);
    writeHash();
    pollNow();
  });
  $("#model").addEventListener("change", (event) => selectModel(event.target.value));
  $("#controls").addEventListener("submit", (event) => event.preventDefault());
  let resize = null;
  window.addEventListener("resize", () => {
    clearTimeout(resize);
    resize = setTimeout(() => state.data && drawCharts(state.data), 150);
  });
}

function limitWindows(keep) {
  for (const option of $("#window").options) {
    option.disabled = Number(option.value) > keep + 1e-6;
  }
}

// --------------------------------------------------------------------------
// Polling
// --------------------------------------------------------------------------

function pollNow() {
  if (state.busy) {
    state.again = true;
    return;
  }
  poll();
}

async function poll() {
  clearTimeout(state.timer);
  state.busy = true;
  const w = state.window;
  const step = Math.max(w / 150, state.bucket || 0);
  const model = state.model ? `&model=${encodeURIComponent(state.model)}` : "";
  const asked = await Promise.allSettled([
    api(`/api/monitor/summary?window=${w}`),
    api(`/api/monitor/series?window=${w}&step=${step}${model}`),
    api(`/api/monitor/process?window=${w}`),
    api("/api/monitor/jobs"),
    api("/api/alerts"),
    api(`/api/advice?window=${w}`),
    api("/api/monitor/fusions"),
  ]);
  const failed = asked.filter((r) => r.status === "rejected").map((r) => r.reason);
  const [summary, series, process, jobs, alerts, advice, fusions] = asked.map((r) =>
    r.status === "fulfilled" ? r.value : null,
  );
  try {
    report(failed);
    if (summary) {
      state.bucket = summary.bucket_s || state.bucket;
      state.keep = summary.keep_s || state.keep;
      if (state.keep) limitWindows(state.keep);
      const data = { summary, series, process, jobs, alerts, advice, fusions, at: Date.now() };
      state.data = data;
      render(data);
    }
  } catch (error) {
    console.error("dashboard: drawing failed", error);
  }
  state.busy = false;
  state.timer = setTimeout(poll, state.again ? 0 : POLL_MS);
  state.again = false;
}

function report(failed) {
  const unauthorised = failed.find((e) => e.status === 401);
  const unreachable = failed.find((e) => e.status === 0);
  const unavailable = failed.find((e) => e.status === 503);
  const since = state.lastOk ? `; the figures shown are from ${clock(state.lastOk / 1000)}` : "";
  if (unauthorised) {
    setStatus("auth", "API key needed");
    askForKey(unauthorised.message);
    return;
  }
  if (unreachable) {
    state.downSince = state.downSince || Date.now();
    setStatus(
      "down",
      `Daemon unreachable since ${clock(state.downSince / 1000)}: retrying every ` +
        `${POLL_MS / 1000} s${since}`,
    );
    return;
  }
  state.downSince = null;
  if (unavailable) {
    setStatus("starting", unavailable.message + since);
    return;
  }
  state.lastOk = Date.now();
  if (failed.length) {
    setStatus("partial", `Live, but ${failed[0].message}`);
  } else {
    setStatus("live", `Live · updated ${clock(state.lastOk / 1000)}`);
  }
}

// --------------------------------------------------------------------------
// Drawing
// --------------------------------------------------------------------------

function render(data) {
  const { summary } = data;
  const models = summary.models || {};
  syncModelSelect(Object.keys(models));
  renderKpis(summary);
  renderModels(summary);
  drawCharts(data);
  renderAlerts(summary, data.alerts);
  renderAdvice(data.advice);
  renderFusions(data.fusions);
  const dropped = summary.events_dropped || 0;
  const sinkErrors = Object.entries(summary.sink_errors || {});
  $("#foot").textContent =
    `Figures over the last ${fmtWindow(summary.window_s)} · buckets of ${summary.bucket_s} s` +
    ` · monitor events dropped: ${fmtInt(dropped)}` +
    (sinkErrors.length ? ` · sink errors: ${sinkErrors.map(([k, v]) => `${k} ${v}`).join(", ")}` : "");
}

function totals(models) {
  const rows = Object.values(models);
  const sum = (key) => rows.reduce((n, m) => n + (m[key] || 0), 0);
  const requests = sum("requests");
  const p95s = rows.map((m) => m.latency_p95_ms).filter((v) => v !== null && v !== undefined);
  return {
    rps: sum("rps"),
    requests,
    errorRate: requests ? sum("errors") / requests : 0,
    tokens: sum("tokens_out_per_s"),
    p95: p95s.length ? Math.max(...p95s) : null,
  };
}

function renderKpis(summary) {
  const t = totals(summary.models || {});
  const process = summary.process || {};
  const firing = (summary.alerts_firing || []).length;
  const items = [
    ["rps", "Requests/s", fmtRate(t.rps), t.rps, ""],
    ["p95", "Worst p95 latency", fmtMs(t.p95), t.p95, ""],
    ["error_rate", "Error rate", fmtPct(t.errorRate), t.errorRate, t.errorRate >= 0.05 ? "bad" : ""],
    ["tokens", "Tokens/s out", fmtRate(t.tokens), t.tokens, ""],
    ["rss", "Memory", process.rss_mb === undefined ? DASH : `${fmtRate(process.rss_mb)} MiB`, process.rss_mb, ""],
    ["cpu", "CPU", process.cpu_percent === undefined ? DASH : `${fmtRate(process.cpu_percent)} %`, process.cpu_percent, ""],
    ["alerts", "Alerts firing", String(firing), firing, firing ? "bad" : "good"],
  ];
  $("#kpis").replaceChildren(
    ...items.map(([key, label, text, value, tone]) =>
      h(
        "div",
        { class: `kpi ${tone}` },
        h("dt", { text: label }),
        h("dd", { "data-kpi": key, "data-value": value ?? "", text }),
      ),
    ),
  );
}

function cell(field, value, text, cls = "num") {
  return h("td", { class: cls, "data-field": field, "data-value": value ?? "", text });
}

function renderModels(summary) {
  const models = summary.models || {};
  const names = Object.keys(models).sort();
  const body = $("#models tbody");
  $("#models-sub").textContent = `over the last ${fmtWindow(summary.window_s)}`;
  $("#models").dataset.windowS = summary.window_s;
  show($("#models-empty"), names.length === 0);
  show($("#models"), names.length > 0);
  body.replaceChildren(
    ...names.map((name) => {
      const m = models[name];
      const pick = h(
        "button",
        { type: "button", class: "model-link", "aria-pressed": String(state.model === name), title: "Chart this model" },
        name,
      );
      pick.addEventListener("click", () => selectModel(state.model === name ? "" : name));
      const caps = Object.keys(m.capabilities || {});
      const first = h("th", { scope: "row" }, pick, caps.length ? h("span", { class: "caps", text: caps.join(" · ") }) : null);
      const errors = h(
        "td",
        { class: `num ${m.error_rate >= 0.05 ? "bad" : ""}`, "data-field": "errors", "data-value": m.errors },
        fmtInt(m.errors),
        m.requests ? h("span", { class: "minor", "data-field": "error_rate", "data-value": m.error_rate, text: ` ${fmtPct(m.error_rate)}` }) : null,
      );
      const batch = m.batch_size_mean === null || m.batch_size_mean === undefined
        ? DASH
        : `${fmtRate(m.batch_size_mean)}${m.max_batch_size ? ` / ${m.max_batch_size}` : ""}`;
      const live = m.loaded ? `${fmtInt(m.queued || 0)} / ${fmtInt(m.in_flight || 0)}` : DASH;
      const evaluation = m.evaluation || null;
      const accuracy = evaluation && typeof evaluation.score === "number"
        ? `${evaluation.score.toFixed(3)}${typeof evaluation.registered === "number" ? ` (reg. ${evaluation.registered.toFixed(3)})` : ""}`
        : DASH;
      const where = placement(m);
      const stateText = m.loaded
        ? `loaded${m.provider ? ` · ${m.provider}` : ""}${where.text ? ` · ${where.text}` : ""}`
        : "not loaded";
      return h(
        "tr",
        { "data-model": name, class: state.model === name ? "selected" : "" },
        first,
        cell("requests", m.requests, fmtInt(m.requests)),
        cell("rps", m.rps, fmtRate(m.rps)),
        errors,
        cell("latency_p50_ms", m.latency_p50_ms, fmtMs(m.latency_p50_ms)),
        cell("latency_p95_ms", m.latency_p95_ms, fmtMs(m.latency_p95_ms)),
        cell("latency_p99_ms", m.latency_p99_ms, fmtMs(m.latency_p99_ms)),
        cell("queue_wait_p95_ms", m.queue_wait_p95_ms, fmtMs(m.queue_wait_p95_ms)),
        cell("tokens_out_per_s", m.tokens_out_per_s, fmtRate(m.tokens_out_per_s)),
        cell("batch_size_mean", m.batch_size_mean, batch),
        cell("queued", m.queued, live),
        cell("accuracy", evaluation ? evaluation.score : null, accuracy),
        h(
          "td",
          {
            class: `state${m.loaded ? " on" : ""}${where.bad ? " bad" : ""}`,
            "data-field": "state",
            "data-placed": m.placed || "",
            "data-health": where.health,
          },
          stateText,
        ),
      );
    }),
  );
}

// Where a loaded model runs and what its executor says of it, as `llmos top`
// shows it: "ray HEALTHY 2 RUNNING", "ray error: …"; nothing for this process.
function placement(m) {
  const health = m.health || null;
  if (!health) return { text: m.placed || "", bad: false, health: "" };
  const where = m.placed ? `${m.placed} ` : "";
  if ("error" in health) {
    const error = String(health.error);
    return {
      text: `${where}error: ${error.length <= 60 ? error : `${error.slice(0, 57)}...`}`,
      bad: true,
      health: "error",
    };
  }
  const status = String(health.status || "?");
  const replicas = health.replicas && typeof health.replicas === "object"
    ? Object.entries(health.replicas).map(([state, n]) => `${n} ${state}`).join(" ")
    : "";
  return { text: `${where}${status}${replicas ? ` ${replicas}` : ""}`, bad: status !== "HEALTHY", health: status };
}

// The window's span of time; while the daemon is younger than the window,
// only its life (the summary's window_s says how long that is).
function timeDomain(data) {
  const series = data.series || {};
  const points = series.points || [];
  const end = points.length ? points[points.length - 1].time : Date.now() / 1000;
  const step = series.step_s || 1;
  const span = Math.min(series.window_s || state.window, Math.max(data.summary.window_s + step, 10 * step));
  return { min: end - span, max: end, time: true };
}

function drawCharts(data) {
  const series = data.series || { points: [], step_s: 1 };
  const points = series.points || [];
  const step = series.step_s || 1;
  const x = timeDomain(data);
  const at = (key, scale = 1) => points.map((p) => [p.time, p[key] === null || p[key] === undefined ? null : p[key] * scale]);
  const who = state.model || "all models";
  $("#charts-title").textContent = `Over time: ${who}`;
  $("#charts-sub").textContent = `last ${fmtWindow(state.window)}, a point every ${fmtWindow(step)}`;
  const noRequests = "No requests in this window";
  const plot = (id) => $(`#${id} .plot`);
  drawChart(plot("chart-latency"), {
    title: `Latency of ${who}`,
    series: [
      { key: "latency_p50_ms", label: "p50", points: at("latency_p50_ms"), area: true },
      { key: "latency_p95_ms", label: "p95", points: at("latency_p95_ms") },
      { key: "latency_p99_ms", label: "p99", points: at("latency_p99_ms") },
    ],
    x,
    y: { format: fmtMs },
    empty: noRequests,
  });
  const busy = points.some((p) => p.requests > 0);
  drawChart(plot("chart-rps"), {
    title: `Requests per second of ${who}`,
    series: [{ key: "rps", label: "requests/s", points: busy ? at("rps") : [], area: true }],
    x,
    y: { format: fmtRate },
    empty: noRequests,
  });
  drawChart(plot("chart-tokens"), {
    title: `Generated tokens per second of ${who}`,
    series: [{ key: "tokens_out_per_s", label: "tokens/s", points: busy ? at("tokens_out_per_s") : [], area: true }],
    x,
    y: { format: fmtRate },
    empty: noRequests,
  });
  drawChart(plot("chart-errors"), {
    title: `Errors per second of ${who}`,
    series: [{ key: "errors_per_s", label: "errors/s", points: busy ? at("errors", 1 / step) : [], area: true }],
    x,
    y: { format: fmtRate },
    empty: noRequests,
  });
  const samples = ((data.process && data.process.data) || []).filter((s) => s.time >= x.min);
  const sampled = (key) => samples.map((s) => [s.time, typeof s[key] === "number" ? s[key] : null]);
  drawChart(plot("chart-memory"), {
    title: "Resident memory of the daemon",
    series: [{ key: "rss_mb", label: "resident", points: sampled("rss_mb"), area: true }],
    x,
    y: { format: (v) => `${fmtRate(v)} MiB` },
    empty: "No samples yet",
  });
  drawChart(plot("chart-cpu"), {
    title: "CPU use of the daemon",
    series: [{ key: "cpu_percent", label: "CPU", points: sampled("cpu_percent"), area: true }],
    x,
    y: { format: (v) => `${fmtRate(v)} %` },
    empty: "No samples yet",
  });
  renderJobs(data.jobs);
}

function renderAlerts(summary, alerts) {
  const firing = summary.alerts_firing || [];
  const states = (alerts && alerts.data) || firing;
  const shown = states.filter((s) => s.status === "firing" || s.status === "pending");
  const rules = (alerts && alerts.rules) || [];
  const refused = Object.entries((alerts && alerts.refused) || {});
  $("#alerts-sub").textContent = rules.length
    ? `${firing.length} firing · ${rules.length} rule${rules.length === 1 ? "" : "s"}`
    : "no alert rules configured ([alerts.NAME] in the config)";
  const list = $("#alerts");
  list.replaceChildren(
    ...shown.map((s) => {
      const op = s.op || ">";
      const where = s.model ? ` on ${s.model}` : "";
      const since = s.status === "firing" ? `firing since ${clock(s.fired_at)}` : `pending since ${clock(s.since)}`;
      return h(
        "li",
        { class: `card ${s.status}`, "data-alert": s.alert, "data-status": s.status },
        h("div", { class: "card-head" }, badge(s.status === "firing" ? s.severity : "pending", s.status === "firing" ? s.severity : "pending"), h("strong", { text: `${s.alert}${where}` })),
        h("p", { class: "rule" }, h("code", { text: `${s.metric} ${op} ${fmtNumber(s.threshold)}` }), ` · now ${s.value === null ? DASH : fmtNumber(s.value)}`, ` · over ${fmtWindow(s.window_s)}`),
        s.description ? h("p", { text: s.description }) : null,
        h("p", { class: "minor", text: `${since} (${fmtAgo(s.status === "firing" ? s.fired_at : s.since)})` }),
      );
    }),
    ...refused.map(([name, why]) =>
      h("li", { class: "card refused" }, h("div", { class: "card-head" }, badge("critical", "refused"), h("strong", { text: name })), h("p", { text: why })),
    ),
  );
  show($("#alerts-empty"), shown.length === 0 && refused.length === 0);
  const history = (alerts && alerts.history) || [];
  const details = $("#alerts-history");
  show(details, history.length > 0);
  details.querySelector("ol").replaceChildren(
    ...history.slice(0, 10).map((event) =>
      h("li", { text: `${clock(event.time)} · ${event.alert}${event.model ? ` on ${event.model}` : ""} ${event.status} (${event.metric} ${event.value === null ? DASH : fmtNumber(event.value)})` }),
    ),
  );
}

function renderAdvice(advice) {
  const items = (advice && advice.data) || [];
  $("#advice-sub").textContent = advice ? `from the last ${fmtWindow(advice.window_s)} of figures` : "";
  $("#advice").replaceChildren(
    ...items.map((a) =>
      h(
        "li",
        { class: `card ${a.severity}`, "data-advice": a.id },
        h("div", { class: "card-head" }, badge(a.severity), h("strong", { text: a.title })),
        h("p", { text: a.action }),
        Object.keys(a.evidence || {}).length
          ? h(
              "dl",
              { class: "evidence" },
              ...Object.entries(a.evidence).flatMap(([k, v]) => [
                h("dt", { text: k }),
                h("dd", { text: fmtEvidence(v) }),
              ]),
            )
          : null,
        a.config ? h("pre", {}, h("code", { text: a.config })) : null,
      ),
    ),
  );
  show($("#advice-empty"), items.length === 0);
}

function jobFigures(points) {
  const devKeys = new Set();
  for (const p of points) for (const k of Object.keys(p)) if (/^(dev|eval|validation)[/_]/.test(k)) devKeys.add(k);
  return [...devKeys].sort();
}

function renderJobs(jobs) {
  const all = ((jobs && jobs.data) || []).slice(-MAX_JOBS).reverse();
  show($("#jobs-empty"), all.length === 0);
  $("#jobs").replaceChildren(
    ...all.map((job) => {
      const points = job.points || [];
      const latest = points.length ? points[points.length - 1] : {};
      const xOf = (p, i) => (typeof p.step === "number" ? p.step : i + 1);
      const xs = points.map(xOf);
      const total = typeof latest.total_steps === "number" ? latest.total_steps : Math.max(...xs, 1);
      const scores = Object.entries(job.scores || {}).map(([k, v]) => `${k} ${fmtNumber(v)}`).join(" · ");
      const stateName = job.state || (points.length ? "running" : "queued");
      const figure = h("figure", { class: "chart" }, h("figcaption", {}, "Loss ", h("span", { text: "by step" })), h("div", { class: "plot" }));
      const devFigure = h("figure", { class: "chart" }, h("figcaption", {}, "Dev figures ", h("span", { text: "by step" })), h("div", { class: "plot" }));
      const card = h(
        "article",
        { class: "job", "data-job": job.job },
        h(
          "header",
          {},
          h("h3", { text: job.model || job.job }),
          badge(stateName === "failed" ? "critical" : stateName === "succeeded" ? "ok" : "info", stateName),
          h("span", { class: "minor", text: `job ${job.job}` }),
        ),
        h(
          "p",
          { class: "job-figures" },
          `step ${fmtInt(typeof latest.step === "number" ? latest.step : points.length)} of ${fmtInt(total)}`,
          typeof latest.loss === "number" ? ` · loss ${fmtNumber(latest.loss)}` : "",
          scores ? ` · ${scores}` : "",
        ),
        h("div", { class: "job-charts" }, figure, devFigure),
      );
      // drawn once the card is in the page (the charts need its width)
      card.draw = () => {
        const x = { min: Math.min(...xs, 0), max: Math.max(total, ...xs, 1), format: fmtInt, label: "step" };
        drawChart(figure.querySelector(".plot"), {
          title: `Loss of tuning job ${job.job}`,
          series: [{ key: "loss", label: "loss", points: points.map((p, i) => [xOf(p, i), typeof p.loss === "number" ? p.loss : null]), area: true, connect: true }],
          x,
          y: { format: fmtNumber },
          empty: "No loss reported yet",
        });
        const dev = jobFigures(points);
        devFigure.hidden = dev.length === 0;
        if (dev.length) {
          drawChart(devFigure.querySelector(".plot"), {
            title: `Dev figures of tuning job ${job.job}`,
            series: dev.map((k) => ({ key: k, label: k, points: points.map((p, i) => [xOf(p, i), typeof p[k] === "number" ? p[k] : null]), connect: true })),
            x,
            y: { format: fmtNumber, max: 1 },
            empty: "No dev figures yet",
          });
        }
      };
      return card;
    }),
  );
  for (const card of $("#jobs").children) card.draw();
}

function renderFusions(fusions) {
  const data = (fusions && fusions.data) || {};
  const names = Object.keys(data).sort();
  show($("#fusions-panel"), names.length > 0);
  if (!names.length) return;
  const head = h("tr", {}, ...["Fusion", "Member", "Asked", "Answered", "Agreed", "Slowest call"].map((t, i) => h("th", { scope: "col", class: i > 1 ? "num" : "", text: t })));
  const rows = names.flatMap((fusion) =>
    Object.entries(data[fusion]).map(([member, f]) =>
      h(
        "tr",
        {},
        h("th", { scope: "row", text: fusion }),
        h("td", { text: member }),
        h("td", { class: "num", text: fmtInt(f.asked) }),
        h("td", { class: "num", text: fmtInt(f.answered) }),
        h("td", { class: "num", text: f.answered ? `${fmtInt(f.agreed)} (${fmtPct(f.agreed / f.answered)})` : fmtInt(f.agreed) }),
        h("td", { class: "num", text: fmtMs((f.latency_s_max || 0) * 1000) }),
      ),
    ),
  );
  $("#fusions").replaceChildren(h("table", { class: "models" }, h("thead", {}, head), h("tbody", {}, ...rows)));
}

// --------------------------------------------------------------------------

setupKey();
setupControls();
poll();
