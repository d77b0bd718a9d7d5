// Small SVG line charts: no library, no network.
//
// drawChart(container, options) replaces what the container holds with an
// <svg> (axes, grid, one <path> per series) and a legend. Every series path
// says what it drew: data-series (its key), data-points (how many non-empty
// points) and data-last (its last non-empty value), so that a test, or a
// person with the inspector, can check the chart against the API.

// The SVG namespace as the HTML parser gives it (the page names no URL).
const SVG = (() => {
  const probe = document.createElement("div");
  probe.innerHTML = "<svg></svg>";
  return probe.firstChild.namespaceURI;
})();
const HEIGHT = 190;
const MARGIN = { top: 12, right: 14, bottom: 26, left: 52 };

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (parent) parent.appendChild(node);
  return node;
}

function html(name, cls, text) {
  const node = document.createElement(name);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A tick's label: no more digits than it needs (0.25, 1.5, 20, 1,500).
export function tick(v) {
  return Number(v.toPrecision(6)).toLocaleString("en", { maximumFractionDigits: 6 });
}

// About `count` round ticks from lo to hi (1, 2, 2.5 or 5 times a power of ten).
export function niceTicks(lo, hi, count = 4) {
  if (!(hi > lo)) hi = lo + 1;
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.floor(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Number(v.toPrecision(12)));
  }
  if (ticks[ticks.length - 1] < hi) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200];

function timeTicks(lo, hi, count) {
  const step = TIME_STEPS.find((s) => (hi - lo) / s <= count) || 7200;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) ticks.push(t);
  return { ticks, step };
}

export function clock(seconds, withSeconds = true) {
  const d = new Date(seconds * 1000);
  const two = (n) => String(n).padStart(2, "0");
  const hm = `${two(d.getHours())}:${two(d.getMinutes())}`;
  return withSeconds ? `${hm}:${two(d.getSeconds())}` : hm;
}

function lastValue(points) {
  for (let i = points.length - 1; i >= 0; i -= 1) {
    if (points[i][1] !== null && Number.isFinite(points[i][1])) return points[i][1];
  }
  return null;
}

function nearest(points, x) {
  let best = null;
  for (const p of points) {
    if (p[1] === null || !Number.isFinite(p[1])) continue;
    if (best === null || Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
  }
  return best;
}

// options:
//   series: [{key, label, points: [[x, y|null], …], area?: bool, connect?: bool}]
//   x: {min, max, time?: bool, format?: (x) => string, label?}
//   y: {format: (y) => string (legend, accessible name), max?: number}
//   title: text for the accessible name
//   empty: what to say when no series has a point
export function drawChart(container, options) {
  const { x, y } = options;
  const xMin = x.min;
  const xMax = x.max > x.min ? x.max : x.min + 1;
  // only what falls in the domain; a series with `connect` draws across its gaps
  // (figures reported every few steps), the others break there (no data)
  const series = options.series.map((s) => {
    const inside = s.points.filter((p) => p[0] >= xMin - 1e-9 && p[0] <= xMax + 1e-9);
    return { ...s, points: s.connect ? inside.filter((p) => p[1] !== null && Number.isFinite(p[1])) : inside };
  });
  const width = Math.max(container.clientWidth || 0, 280);
  const inner = { w: width - MARGIN.left - MARGIN.right, h: HEIGHT - MARGIN.top - MARGIN.bottom };
  const drawn = series.map((s) => s.points.filter((p) => p[1] !== null && Number.isFinite(p[1])));
  const total = drawn.reduce((n, pts) => n + pts.length, 0);
  let top = Math.max(y.max || 0, ...drawn.flat().map((p) => p[1]));
  if (!(top > 0)) top = 1;
  const yTicks = niceTicks(0, top, 4);
  top = yTicks[yTicks.length - 1];
  const sx = (v) => MARGIN.left + ((v - xMin) / (xMax - xMin)) * inner.w;
  const sy = (v) => MARGIN.top + inner.h - (v / top) * inner.h;

  const svg = el("svg", {
    width,
    height: HEIGHT,
    viewBox: `0 0 ${width} ${HEIGHT}`,
    role: "img",
    class: "chart-svg",
    "data-total-points": total,
  });
  const summary = series
    .map((s, i) => {
      const last = lastValue(s.points);
      return `${s.label} ${last === null ? "no data" : y.format(last)}`;
    })
    .join(", ");
  svg.setAttribute("aria-label", `${options.title}: ${total ? summary : options.empty}`);

  // grid and y axis
  const grid = el("g", { class: "grid" }, svg);
  for (const t of yTicks) {
    el("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: sy(t), y2: sy(t) }, grid);
    const label = el("text", { x: MARGIN.left - 6, y: sy(t), class: "tick y" }, grid);
    label.textContent = tick(t);
  }
  // x axis
  const axis = el("g", { class: "axis" }, svg);
  el("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: sy(0), y2: sy(0) }, axis);
  const want = Math.max(Math.floor(inner.w / 90), 2);
  let xTicks;
  let xFormat = x.format;
  if (x.time) {
    const found = timeTicks(xMin, xMax, want);
    xTicks = found.ticks;
    xFormat = (t) => clock(t, found.step < 60);
  } else {
    xTicks = niceTicks(xMin, xMax, want).filter((t) => t >= xMin && t <= xMax);
  }
  for (const t of xTicks) {
    el("line", { x1: sx(t), x2: sx(t), y1: sy(0), y2: sy(0) + 4 }, axis);
    const label = el("text", { x: sx(t), y: HEIGHT - 6, class: "tick x" }, axis);
    label.textContent = xFormat(t);
  }
  if (x.label) {
    const label = el("text", { x: width - MARGIN.right, y: HEIGHT - 6, class: "tick x end" }, axis);
    label.textContent = x.label;
  }

  // series
  const lines = el("g", { class: "lines" }, svg);
  series.forEach((s, i) => {
    const parts = [];
    const lone = [];
    let run = [];
    const flush = () => {
      if (run.length === 1) lone.push(run[0]);
      if (run.length) parts.push(run.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(""));
      run = [];
    };
    for (const p of s.points) {
      if (p[1] === null || !Number.isFinite(p[1])) flush();
      else run.push(p);
    }
    flush();
    if (s.area && drawn[i].length > 1) {
      const pts = drawn[i];
      const d = `M${sx(pts[0][0]).toFixed(1)},${sy(0)}` +
        pts.map((p) => `L${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("") +
        `L${sx(pts[pts.length - 1][0]).toFixed(1)},${sy(0)}Z`;
      el("path", { d, class: `area c${i}` }, lines);
    }
    const last = lastValue(s.points);
    el("path", {
      d: parts.join(""),
      class: `line c${i}`,
      "data-series": s.key,
      "data-points": drawn[i].length,
      "data-last": last === null ? "" : last,
    }, lines);
    for (const p of lone) el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: `dot c${i}` }, lines);
  });

  if (!total) {
    const note = el("text", { x: MARGIN.left + inner.w / 2, y: MARGIN.top + inner.h / 2, class: "empty-note" }, svg);
    note.textContent = options.empty;
  }

  // legend, with the value under the pointer (or the last one)
  const legend = html("ul", "legend");
  const values = series.map((s, i) => {
    const item = html("li", `c${i}`);
    item.appendChild(html("span", "swatch"));
    item.appendChild(html("span", "name", s.label));
    const value = html("span", "value");
    item.appendChild(value);
    legend.appendChild(item);
    return value;
  });
  const show = (at) => {
    series.forEach((s, i) => {
      const p = at === null ? [null, lastValue(s.points)] : nearest(s.points, at);
      values[i].textContent = !p || p[1] === null ? "–" : y.format(p[1]);
    });
  };
  show(null);

  if (total) {
    const guide = el("line", { class: "guide", y1: MARGIN.top, y2: sy(0), visibility: "hidden" }, svg);
    const when = el("text", { class: "tick guide-label", y: MARGIN.top + 10 }, svg);
    const hit = el("rect", { x: MARGIN.left, y: MARGIN.top, width: inner.w, height: inner.h, class: "hit" }, svg);
    hit.addEventListener("pointermove", (event) => {
      const box = svg.getBoundingClientRect();
      const px = event.clientX - box.left;
      const at = xMin + ((px - MARGIN.left) / inner.w) * (xMax - xMin);
      guide.setAttribute("x1", px);
      guide.setAttribute("x2", px);
      guide.setAttribute("visibility", "visible");
      when.setAttribute("x", Math.min(px + 4, width - 60));
      when.textContent = x.time ? clock(at) : xFormat(at);
      show(at);
    });
    hit.addEventListener("pointerleave", () => {
      guide.setAttribute("visibility", "hidden");
      when.textContent = "";
      show(null);
    });
  }

  container.replaceChildren(svg, legend);
}
