// Small SVG charts drawn here instead of a vendored library: a time series of a few lines and
// a stacked bar chart. Colours come from CSS classes (.series-0, .series-1, ...) so they follow
// the light/dark theme. Each chart keeps its numbers on the element (data-points, data-max) and
// writes its latest values as text, so screen readers and tests read what the lines show.

const SVG = "http://www.w3.org/2000/svg";
const W = 320;
const H = 150;
const PAD = { left: 40, right: 8, top: 8, bottom: 20 };

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// 1234 -> "1.2k"; 0.0123 -> "0.012": short tick labels.
export function compact(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
  if (a >= 100 || a === 0) return v.toFixed(0);
  if (a >= 1) return v.toFixed(1).replace(/\.0$/, "");
  return String(parseFloat(v.toPrecision(2)));
}

// A "nice" upper bound for the axis: 1, 2 or 5 times a power of ten.
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function frame(container, title, label) {
  container.textContent = "";
  container.classList.add("chart");
  const heading = document.createElement("h3");
  heading.textContent = title;
  container.appendChild(heading);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label || title }, container);
  const legend = document.createElement("p");
  legend.className = "legend";
  container.appendChild(legend);
  return { svg, legend };
}

function axes(svg, max, unit) {
  const plotH = H - PAD.top - PAD.bottom;
  for (const f of [0, 0.5, 1]) {
    const y = PAD.top + plotH * (1 - f);
    el("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "grid" }, svg);
    const t = el("text", { x: PAD.left - 4, y: y + 3, class: "tick", "text-anchor": "end" }, svg);
    t.textContent = compact(max * f) + (f === 1 && unit ? unit : "");
  }
}

// A rolling window of samples for a few named series; `push` adds one sample (null = no value
// at that time, drawn as a gap) and redraws.
export class TimeSeriesChart {
  constructor(container, { title, series, unit = "", capacity = 90, format = compact }) {
    this.container = container;
    this.title = title;
    this.series = series;
    this.unit = unit;
    this.capacity = capacity;
    this.format = format;
    this.samples = [];
    this.render();
  }

  reset(samples) {
    this.samples = samples.slice(-this.capacity);
    this.render();
  }

  push(values) {
    this.samples.push(values);
    if (this.samples.length > this.capacity) this.samples.shift();
    this.render();
  }

  render() {
    const { svg, legend } = frame(this.container, this.title);
    let max = 0;
    for (const s of this.samples) for (const v of s) if (v !== null && v > max) max = v;
    const top = niceMax(max);
    axes(svg, top, this.unit);
    const plotW = W - PAD.left - PAD.right;
    const plotH = H - PAD.top - PAD.bottom;
    // Until the window fills, a shorter span: the first minutes are not squeezed into a corner.
    const span = Math.min(this.capacity, Math.max(this.samples.length, 30));
    const step = plotW / Math.max(1, span - 1);
    const x0 = PAD.left + plotW - step * (this.samples.length - 1);
    this.series.forEach((_, i) => {
      let d = "";
      let pen = false;
      this.samples.forEach((s, j) => {
        const v = s[i];
        if (v === null || v === undefined) { pen = false; return; }
        const x = x0 + j * step;
        const y = PAD.top + plotH * (1 - v / top);
        d += (pen ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
        pen = true;
      });
      if (d) el("path", { d, class: `line series-${i}` }, svg);
    });
    const latest = this.samples.length ? this.samples[this.samples.length - 1] : [];
    legend.textContent = "";
    this.series.forEach((name, i) => {
      const item = document.createElement("span");
      item.className = `key series-${i}`;
      const v = latest[i];
      item.textContent = `${name}: ${v === null || v === undefined ? "-" : this.format(v) + this.unit}`;
      legend.appendChild(item);
    });
    this.container.dataset.points = String(this.samples.length);
    this.container.dataset.max = String(max);
  }
}

// Bars per category (a day), one stacked segment per series (a model).
export function stackedBars(container, { title, categories, series, unit = "", format = compact }) {
  const { svg, legend } = frame(container, title);
  const totals = categories.map((_, j) => series.reduce((sum, s) => sum + (s.values[j] || 0), 0));
  const max = Math.max(0, ...totals);
  const top = niceMax(max);
  axes(svg, top, unit);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const slot = plotW / Math.max(1, categories.length);
  const barW = Math.max(2, Math.min(28, slot * 0.7));
  categories.forEach((cat, j) => {
    const x = PAD.left + slot * j + (slot - barW) / 2;
    let base = 0;
    series.forEach((s, i) => {
      const v = s.values[j] || 0;
      if (v <= 0) return;
      const h = plotH * (v / top);
      const rect = el("rect", { x: x.toFixed(1), y: (PAD.top + plotH * (1 - base / top) - h).toFixed(1),
        width: barW.toFixed(1), height: h.toFixed(1), class: `bar series-${i % 6}` }, svg);
      el("title", {}, rect).textContent = `${cat} ${s.name}: ${format(v)}${unit}`;
      base += v;
    });
    const every = Math.ceil(categories.length / 5);  // about five date labels, newest always
    if ((categories.length - 1 - j) % every === 0) {
      const t = el("text", { x: (x + barW / 2).toFixed(1), y: H - 6, class: "tick", "text-anchor": "middle" }, svg);
      t.textContent = cat.slice(5);  // MM-DD
    }
  });
  legend.textContent = "";
  series.forEach((s, i) => {
    const item = document.createElement("span");
    item.className = `key series-${i % 6}`;
    item.textContent = `${s.name}: ${format(s.values.reduce((a, b) => a + (b || 0), 0))}${unit}`;
    legend.appendChild(item);
  });
  container.dataset.points = String(categories.length);
  container.dataset.max = String(max);
}
