// The console: the engine of each deployment from /metrics (scraped every few seconds, kept as
// a rolling history per deployment), and, with a key, its usage per day, balance and limits;
// with an admin key, the accounts and keys, and the admin's actions on them: create a key (shown
// once), revoke one, top up an account, change its tier, status and limits.
import { apiJson, getKey, setKey } from "./api.js";
import { TimeSeriesChart, compact, stackedBars } from "./charts.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(window.location.search);
const SCRAPE_S = Math.max(0.5, Number(params.get("interval")) || 2);
const PLATFORM_REFRESH_S = 15;

// ---- Prometheus text ------------------------------------------------------------------------

function parseLabels(text) {
  const labels = {};
  const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  let m;
  while ((m = re.exec(text))) labels[m[1]] = m[2].replace(/\\"/g, '"').replace(/\\n/g, "\n").replace(/\\\\/g, "\\");
  return labels;
}

export function parsePrometheus(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (m) samples.push({ name: m[1], labels: parseLabels(m[2] || ""), value: Number(m[3]) });
  }
  return samples;
}

function sum(samples, name, model, filter) {
  return samples.filter((s) => s.name === name && s.labels.model === model && (!filter || filter(s.labels)))
    .reduce((a, s) => a + s.value, 0);
}

function buckets(samples, name, model) {
  return samples.filter((s) => s.name === name + "_bucket" && s.labels.model === model)
    .map((s) => ({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), count: s.value }))
    .sort((a, b) => a.le - b.le);
}

// Prometheus' histogram_quantile: linear inside the bucket that holds the rank.
export function quantile(q, bucketList) {
  if (!bucketList.length) return null;
  const total = bucketList[bucketList.length - 1].count;
  if (!(total > 0)) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const b of bucketList) {
    if (b.count >= rank) {
      if (b.le === Infinity) return prevLe;
      const inBucket = b.count - prevCount;
      return inBucket > 0 ? prevLe + (b.le - prevLe) * ((rank - prevCount) / inBucket) : b.le;
    }
    prevLe = b.le;
    prevCount = b.count;
  }
  return prevLe;
}

function minus(now, before) {
  if (!before) return now;
  return now.map((b, i) => ({ le: b.le, count: b.count - ((before[i] && before[i].count) || 0) }));
}

function snapshot(samples, model, time) {
  return {
    time,
    running: sum(samples, "lmserve_num_requests_running", model),
    waiting: sum(samples, "lmserve_num_requests_waiting", model),
    kv: sum(samples, "lmserve_kv_cache_usage_ratio", model),
    hit: sum(samples, "lmserve_prefix_cache_hit_rate", model),
    generated: sum(samples, "lmserve_generation_tokens_total", model),
    prompt: sum(samples, "lmserve_prompt_tokens_total", model),
    ok: sum(samples, "lmserve_requests_total", model, (l) => l.status.startsWith("2")),
    clientErrors: sum(samples, "lmserve_requests_total", model, (l) => l.status.startsWith("4")),
    serverErrors: sum(samples, "lmserve_requests_total", model, (l) => l.status.startsWith("5")),
    ttft: buckets(samples, "lmserve_time_to_first_token_seconds", model),
    itl: buckets(samples, "lmserve_inter_token_latency_seconds", model),
  };
}

// ---- engine view ----------------------------------------------------------------------------

const engine = {
  history: new Map(),  // model -> {last: snapshot, samples: {requests, throughput, cache, ttft, itl}}
  charts: null,
  selected: params.get("model") || "",
};

function makeCharts() {
  const ms = (v) => compact(v);
  engine.charts = {
    requests: new TimeSeriesChart($("chart-requests"), { title: "Requests", series: ["running", "waiting"] }),
    throughput: new TimeSeriesChart($("chart-throughput"), { title: "Tokens per second",
      series: ["generated", "prompt"] }),
    cache: new TimeSeriesChart($("chart-cache"), { title: "KV cache and prefix cache", unit: "%",
      series: ["KV cache used", "prefix-cache hits"] }),
    ttft: new TimeSeriesChart($("chart-ttft"), { title: "Time to first token (per interval)", unit: " ms",
      series: ["p50", "p95"], format: ms }),
    itl: new TimeSeriesChart($("chart-itl"), { title: "Inter-token latency (per interval)", unit: " ms",
      series: ["p50", "p95"], format: ms }),
  };
}

function record(model, snap) {
  let h = engine.history.get(model);
  if (!h) {
    h = { last: null, samples: { requests: [], throughput: [], cache: [], ttft: [], itl: [] } };
    engine.history.set(model, h);
  }
  const last = h.last;
  const dt = last ? (snap.time - last.time) / 1000 : 0;
  const rate = (a, b) => (last && dt > 0 ? Math.max(0, (a - b) / dt) : null);
  const ms = (v) => (v === null ? null : v * 1000);
  const add = (name, values) => {
    h.samples[name].push(values);
    if (h.samples[name].length > 90) h.samples[name].shift();
  };
  add("requests", [snap.running, snap.waiting]);
  add("throughput", [rate(snap.generated, last && last.generated), rate(snap.prompt, last && last.prompt)]);
  add("cache", [snap.kv * 100, snap.hit * 100]);
  const ttft = minus(snap.ttft, last && last.ttft);
  const itl = minus(snap.itl, last && last.itl);
  add("ttft", [ms(quantile(0.5, ttft)), ms(quantile(0.95, ttft))]);
  add("itl", [ms(quantile(0.5, itl)), ms(quantile(0.95, itl))]);
  h.last = snap;
}

function stat(list, label, value, id) {
  const dt = document.createElement("dt");
  dt.textContent = label;
  const dd = document.createElement("dd");
  dd.textContent = value;
  if (id) dd.id = id;
  const group = document.createElement("div");
  group.append(dt, dd);
  list.appendChild(group);
}

function showEngine() {
  const h = engine.history.get(engine.selected);
  if (!h || !engine.charts) return;
  for (const [name, chart] of Object.entries(engine.charts)) chart.reset(h.samples[name]);
  const s = h.last;
  const pct = (q, b) => { const v = quantile(q, b); return v === null ? "-" : `${compact(v * 1000)} ms`; };
  const tput = h.samples.throughput[h.samples.throughput.length - 1][0];
  const list = $("engine-stats");
  list.textContent = "";
  stat(list, "Running", String(s.running), "stat-running");
  stat(list, "Waiting", String(s.waiting), "stat-waiting");
  stat(list, "Generated tok/s", tput === null ? "-" : tput.toFixed(1), "stat-tps");
  stat(list, "KV cache used", `${(s.kv * 100).toFixed(1)}%`, "stat-kv");
  stat(list, "Prefix-cache hit rate", `${(s.hit * 100).toFixed(1)}%`, "stat-hit");
  stat(list, "TTFT p50 / p95 / p99", `${pct(0.5, s.ttft)} / ${pct(0.95, s.ttft)} / ${pct(0.99, s.ttft)}`, "stat-ttft");
  stat(list, "ITL p50 / p95 / p99", `${pct(0.5, s.itl)} / ${pct(0.95, s.itl)} / ${pct(0.99, s.itl)}`, "stat-itl");
  stat(list, "Requests 2xx / 4xx / 5xx", `${s.ok} / ${s.clientErrors} / ${s.serverErrors}`, "stat-requests");
  stat(list, "Tokens generated / prompt", `${compact(s.generated)} / ${compact(s.prompt)}`, "stat-tokens");
}

async function scrape() {
  let text;
  try {
    const response = await fetch("/metrics");
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    text = await response.text();
  } catch (e) {
    $("scrape-note").textContent = `metrics unavailable: ${e.message}`;
    return;
  }
  const samples = parsePrometheus(text);
  const now = Date.now();
  const models = [...new Set(samples.filter((s) => s.name === "lmserve_num_requests_running")
    .map((s) => s.labels.model))].sort();
  const select = $("deployment");
  if (select.options.length !== models.length || models.some((m, i) => select.options[i].value !== m)) {
    select.textContent = "";
    for (const m of models) {
      const option = document.createElement("option");
      option.value = option.textContent = m;
      select.appendChild(option);
    }
  }
  if (!models.includes(engine.selected)) engine.selected = models[0] || "";
  select.value = engine.selected;
  for (const m of models) record(m, snapshot(samples, m, now));
  showEngine();
  $("scrape-note").textContent = `updated ${new Date(now).toLocaleTimeString()}, every ${SCRAPE_S} s`;
  document.body.dataset.scrapes = String(Number(document.body.dataset.scrapes || 0) + 1);
}

// ---- the key: usage, balance, limits; admin tables -------------------------------------------

function days(since, count) {
  const out = [];
  const start = Date.parse(since + "T00:00:00Z");
  for (let i = 0; i < count; i++) out.push(new Date(start + i * 86400000).toISOString().slice(0, 10));
  return out;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  row.appendChild(td);
}

function fillTable(table, rows, columns) {
  const body = table.querySelector("tbody");
  body.textContent = "";
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const c of columns) cell(tr, typeof c === "function" ? c(r) : r[c]);
    body.appendChild(tr);
  }
  table.hidden = false;
}

function limitsText(limits) {
  const set = Object.entries(limits || {}).filter(([, v]) => v);
  return set.length ? set.map(([k, v]) => `${k.toUpperCase()} ${compact(v)}`).join(", ") : "-";
}

let adminRefusedFor = null;

async function loadPlatform(force = false) {
  if (!getKey()) {
    $("account-note").textContent = "Enter an API key to see its usage, balance and limits.";
    $("admin-note").textContent = "An admin key shows the accounts and keys.";
    return;
  }
  const n = Number($("usage-days").value);
  try {
    const [info, usage] = await Promise.all([apiJson("/v1/user/info"), apiJson(`/v1/user/usage?days=${n}`)]);
    const a = info.data;
    const list = $("account-stats");
    list.textContent = "";
    stat(list, "Account", `${a.name} (${a.tier || usage.tier})`, "stat-account");
    stat(list, "Key", usage.key, "stat-key");
    stat(list, "Balance (granted + paid)", usage.unlimited ? "unlimited" : `${a.totalBalance} (${a.balance} + ${a.chargeBalance})`,
      "stat-balance");
    stat(list, "Account limits", usage.unlimited ? "none" : limitsText(usage.limits.account), "stat-account-limits");
    const categories = days(usage.since, usage.days);
    const models = [...new Set(usage.data.map((r) => r.model))].sort();
    const series = (value) => models.map((m) => ({ name: m, values: categories.map((d) => usage.data
      .filter((r) => r.model === m && r.date === d).reduce((acc, r) => acc + value(r), 0)) }));
    stackedBars($("chart-usage-tokens"), { title: `Tokens per day (UTC), last ${n} days`, categories,
      series: series((r) => r.prompt_tokens + r.completion_tokens) });
    stackedBars($("chart-usage-cost"), { title: "Cost per day", categories, series: series((r) => Number(r.cost)),
      format: (v) => (v === 0 ? "0" : v < 0.01 ? v.toPrecision(2) : v.toFixed(2)) });
    const perModel = Object.entries(usage.limits.per_model);
    fillTable($("limits-table"), perModel.length ? perModel : [["all models", {}]],
      [(r) => r[0], (r) => r[1].rpm, (r) => r[1].rpd, (r) => r[1].tpm, (r) => r[1].tpd]);
    $("account-note").textContent = usage.unlimited ? "This key belongs to the unlimited bootstrap account." : "";
    await loadBatches();
  } catch (e) {
    $("account-stats").textContent = "";
    $("account-note").textContent = e.describe ? e.describe() : String(e);
  }
  // A key refused once (403: not an admin key) is not asked again on every refresh.
  if (force || adminRefusedFor !== getKey()) await loadAdmin();
  document.body.dataset.platform = String(Number(document.body.dataset.platform || 0) + 1);
}

// The key's account's batches with their progress (lines finished, completed or failed, of all).
async function loadBatches() {
  const batches = (await apiJson("/v1/batches?limit=20")).data;
  const progress = (b) => {
    const c = b.request_counts;
    const done = c.completed + c.failed;
    return c.total ? `${done}/${c.total} (${Math.floor((100 * done) / c.total)}%)` : "0/0";
  };
  fillTable($("batches-table"), batches, ["id", "status", progress, (b) => b.request_counts.failed, "endpoint",
    (b) => new Date(b.created_at * 1000).toISOString().slice(0, 16).replace("T", " ")]);
  $("batches-table").hidden = batches.length === 0;
}

// ---- admin: the tables and the actions (the /admin API; an admin key only) --------------------

const admin = { accounts: [], keys: [] };

async function loadAdmin() {
  try {
    const query = $("show-revoked").checked ? "?include_revoked=true" : "";
    const [accounts, keys] = await Promise.all([apiJson("/admin/accounts"), apiJson("/admin/keys" + query)]);
    admin.accounts = accounts.data;
    admin.keys = keys.data;
    fillTable($("accounts-table"), accounts.data, ["name", "tier", "status", "balance", "charge_balance",
      "total_balance", (r) => (r.unlimited ? "unlimited" : limitsText(r.limits))]);
    fillTable($("keys-table"), keys.data, ["id", "prefix", "name", "account", "tier",
      (r) => (r.models ? r.models.join(", ") : "all"), "status", (r) => (r.admin ? "yes" : "")]);
    addRevokeButtons();
    fillAccountChoices();
    $("admin-actions").hidden = $("show-revoked-field").hidden = false;
    $("admin-note").textContent = "";
  } catch (e) {
    $("accounts-table").hidden = $("keys-table").hidden = true;
    $("admin-actions").hidden = $("show-revoked-field").hidden = true;
    if (e.status === 403) adminRefusedFor = getKey();
    $("admin-note").textContent = e.status === 403 ? "An admin key shows the accounts and keys here."
      : (e.describe ? e.describe() : String(e));
  }
  document.body.dataset.admin = String(Number(document.body.dataset.admin || 0) + 1);
}

// A Revoke button on each key that can still be used; the first click asks, the second revokes.
function addRevokeButtons() {
  const rows = $("keys-table").querySelectorAll("tbody tr");
  admin.keys.forEach((k, i) => {
    const td = document.createElement("td");
    if (k.status === "active" && !k.bootstrap) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "small";
      button.id = `revoke-${k.id}`;
      button.textContent = "Revoke";
      button.setAttribute("aria-label", `Revoke key ${k.id} (${k.prefix}) of ${k.account}`);
      button.addEventListener("click", () => revoke(k, button));
      td.appendChild(button);
    }
    rows[i].appendChild(td);
  });
}

async function revoke(key, button) {
  if (button.dataset.armed !== "true") {
    button.dataset.armed = "true";
    button.textContent = "Confirm revoke";
    setTimeout(() => { if (button.isConnected) { button.dataset.armed = "false"; button.textContent = "Revoke"; } }, 5000);
    return;
  }
  button.disabled = true;
  try {
    const view = await apiJson(`/admin/keys/${key.id}/revoke`, { method: "POST" });
    $("keys-note").textContent = `Revoked key ${view.id} (${view.prefix}) of ${view.account}: refused from its next request.`;
  } catch (e) {
    $("keys-note").textContent = e.describe ? e.describe() : String(e);
  }
  await loadAdmin();
}

function optionalInt(id, what) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 1) throw new Error(`${what} must be a whole number of at least 1`);
  return value;
}

const LIMITS = ["rpm", "tpm", "rpd", "tpd"];

async function createKey(event) {
  event.preventDefault();
  const body = { account: $("ck-account").value.trim() };
  try {
    const name = $("ck-name").value.trim();
    const tier = $("ck-tier").value.trim();
    const balance = $("ck-balance").value.trim();
    const expires = $("ck-expires").value.trim();
    const models = $("ck-models").value.split(",").map((m) => m.trim()).filter(Boolean);
    if (name) body.name = name;
    if (tier) body.tier = tier;
    if (balance) body.balance = balance;
    if (expires) body.expires = expires;
    if (models.length) body.models = models;
    for (const limit of LIMITS) {
      const value = optionalInt(`ck-${limit}`, limit.toUpperCase());
      if (value !== null) body[limit] = value;
    }
    if ($("ck-admin").checked) body.admin = true;
  } catch (e) {
    $("ck-note").textContent = e.message;
    return;
  }
  $("ck-submit").disabled = true;
  try {
    const created = await apiJson("/admin/keys", { method: "POST", body });
    $("new-key-value").textContent = created.key;
    $("new-key").hidden = false;
    $("ck-note").textContent = `Created key ${created.id} (${created.prefix}) for ${created.account}, tier ${created.tier}.`;
    for (const id of ["ck-name", "ck-balance", "ck-expires", "ck-models", ...LIMITS.map((l) => `ck-${l}`)]) $(id).value = "";
    $("ck-admin").checked = false;
  } catch (e) {
    $("ck-note").textContent = e.describe ? e.describe() : String(e);
  } finally {
    $("ck-submit").disabled = false;
  }
  await loadAdmin();
}

// The account form: the choices, and the chosen account's values filled in.
function fillAccountChoices() {
  const select = $("ac-account");
  const previous = select.value;
  const names = admin.accounts.map((a) => a.name);
  if (select.options.length !== names.length || names.some((n, i) => select.options[i].value !== n)) {
    select.textContent = "";
    for (const n of names) {
      const option = document.createElement("option");
      option.value = option.textContent = n;
      select.appendChild(option);
    }
    const list = $("account-names");
    list.textContent = "";
    for (const n of names) {
      const option = document.createElement("option");
      option.value = n;
      list.appendChild(option);
    }
  }
  const tiers = $("tier-names");
  for (const a of admin.accounts) {
    if (![...tiers.options].some((o) => o.value === a.tier)) {
      const option = document.createElement("option");
      option.value = a.tier;
      tiers.appendChild(option);
    }
  }
  if (names.includes(previous)) select.value = previous;
  if (select.value !== select.dataset.shown) showAccount();
}

function showAccount() {
  const select = $("ac-account");
  const a = admin.accounts.find((x) => x.name === select.value);
  select.dataset.shown = select.value;
  if (!a) return;
  $("ac-tier").value = a.tier;
  $("ac-status").value = a.status;
  for (const limit of LIMITS) $(`ac-${limit}`).value = a.limits[limit] || "";
}

async function accountAction(path, init, describe) {
  const name = $("ac-account").value;
  if (!name) return;
  try {
    const a = await apiJson(`/admin/accounts/${encodeURIComponent(name)}${path}`, init);
    $("ac-note").textContent = describe(a);
    $("ac-account").dataset.shown = "";  // show the values as saved
  } catch (e) {
    $("ac-note").textContent = e.describe ? e.describe() : String(e);
  }
  await loadAdmin();
}

async function topUp() {
  const amount = $("ac-amount").value.trim();
  if (!amount) { $("ac-note").textContent = "Enter the amount to add, e.g. 10.00"; return; }
  await accountAction("/topup", { method: "POST", body: { amount, granted: $("ac-granted").checked } },
    (a) => `${a.name}: balance ${a.balance}, paid ${a.charge_balance}, total ${a.total_balance}.`);
  $("ac-amount").value = "";
}

// Save writes the form as it stands: the limits shown are the account's limits (empty: none).
async function saveAccount(event) {
  event.preventDefault();
  const body = { status: $("ac-status").value, clear_limits: true };
  try {
    const tier = $("ac-tier").value.trim();
    if (tier) body.tier = tier;
    for (const limit of LIMITS) {
      const value = optionalInt(`ac-${limit}`, limit.toUpperCase());
      if (value !== null) body[limit] = value;
    }
  } catch (e) {
    $("ac-note").textContent = e.message;
    return;
  }
  await accountAction("", { method: "PATCH", body },
    (a) => `${a.name}: tier ${a.tier}, status ${a.status}, account-wide limits ${limitsText(a.limits)}.`);
}

function init() {
  makeCharts();
  $("api-key").value = getKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setKey($("api-key").value.trim());
    loadPlatform();
  });
  $("deployment").addEventListener("change", () => { engine.selected = $("deployment").value; showEngine(); });
  $("usage-days").addEventListener("change", () => loadPlatform());
  $("refresh-usage").addEventListener("click", () => loadPlatform(true));
  $("show-revoked").addEventListener("change", loadAdmin);
  $("create-key-form").addEventListener("submit", createKey);
  $("new-key-copy").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(
    $("new-key-value").textContent));
  $("new-key-done").addEventListener("click", () => { $("new-key-value").textContent = ""; $("new-key").hidden = true; });
  $("ac-account").addEventListener("change", showAccount);
  $("ac-topup").addEventListener("click", topUp);
  $("account-form").addEventListener("submit", saveAccount);
  scrape();
  setInterval(scrape, SCRAPE_S * 1000);
  loadPlatform();
  setInterval(() => loadPlatform(), PLATFORM_REFRESH_S * 1000);
}

init();
