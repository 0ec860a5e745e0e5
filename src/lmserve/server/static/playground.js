// The chat playground: builds a chat completion request from the form, streams the reply (one
// column, or two side by side), shows each choice in a tab, and writes the same request as code.
import { ApiError, apiJson, getKey, maskKey, setKey, streamChat } from "./api.js";
import { initTabs, selectTab } from "./tabs.js";

const $ = (id) => document.getElementById(id);

const TOOLS_EXAMPLE = [{
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" }, unit: { type: "string", enum: ["C", "F"] } },
      required: ["city"] },
  },
}];
const SCHEMA_EXAMPLE = {
  type: "object",
  properties: { name: { type: "string" }, age: { type: "integer" } },
  required: ["name", "age"],
  additionalProperties: false,
};
// The request fields the OpenAI SDKs take as named arguments; the rest go in extra_body.
const OPENAI_FIELDS = new Set(["model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens",
  "frequency_penalty", "presence_penalty", "stop", "n", "seed", "response_format", "tools", "tool_choice",
  "logprobs", "top_logprobs", "stream", "stream_options", "user", "logit_bias", "parallel_tool_calls"]);

const state = {
  models: [],            // /v1/models entries (with this deployment's defaults)
  conversation: [],      // the messages sent so far (the system prompt is added per request)
  pendingCalls: [],      // the tool calls of the last reply, awaiting their results
  retryCalls: [],        // the calls whose results a failed continuation sent (shown again)
  lastInOutputs: false,  // the last assistant turn is on screen in the output columns
  controllers: [],
  codeLang: "curl",
};

// ---- small helpers --------------------------------------------------------------------------

function showBanner(message) {
  const banner = $("banner");
  banner.textContent = message;
  banner.hidden = !message;
}

function parseJsonField(id, what, expect) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new ApiError(0, `${what} is not valid JSON: ${e.message}`);
  }
  if (expect === "array" && !Array.isArray(value)) throw new ApiError(0, `${what} must be a JSON array`);
  if (expect === "object" && (typeof value !== "object" || value === null || Array.isArray(value))) {
    throw new ApiError(0, `${what} must be a JSON object`);
  }
  return value;
}

// ---- models ---------------------------------------------------------------------------------

async function loadModels() {
  const selects = [$("model-a"), $("model-b")];
  if (!getKey()) {
    showBanner("Enter an API key to list the models (make serve prints one).");
    return;
  }
  try {
    const body = await apiJson("/v1/models");
    state.models = body.data;
  } catch (e) {
    state.models = [];
    selects.forEach((s) => { s.textContent = ""; });
    showBanner(e.describe ? e.describe() : String(e));
    document.body.dataset.models = "error";
    if (e.status === 503) setTimeout(loadModels, 3000);  // still loading its models: ask again shortly
    return;
  }
  showBanner(state.models.length ? "" : "This key may not use any deployed model.");
  selects.forEach((select, i) => {
    const previous = select.value;
    select.textContent = "";
    for (const m of state.models) {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      select.appendChild(option);
    }
    const ids = state.models.map((m) => m.id);
    if (ids.includes(previous)) select.value = previous;
    else if (i === 1 && ids.length > 1) select.value = ids[1];
  });
  fitModelLabels();
  showDefaults();
  document.body.dataset.models = String(state.models.length);
}

// A long model id does not fit the select's width: the shown label keeps its start and, whole,
// its distinguishing end (abbreviated in the middle); the value and the tooltip are the full id.
const labelCanvas = document.createElement("canvas");

function fitModelLabels() {
  for (const select of [$("model-a"), $("model-b")]) {
    const style = getComputedStyle(select);
    const room = select.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - 24;  // the arrow
    if (!(room > 0)) continue;  // not laid out (hidden): fitted when shown
    const ctx = labelCanvas.getContext("2d");
    ctx.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
    for (const option of select.options) {
      option.textContent = abbreviateToWidth(option.value, room, (t) => ctx.measureText(t).width);
      option.title = option.value;
    }
    select.title = select.value;
  }
}

export function abbreviateToWidth(text, room, width) {
  if (width(text) <= room) return text;
  const tailShare = (n) => Math.max(Math.ceil((2 * n) / 3), Math.min(text.length - text.lastIndexOf("/"), n - 1));
  let lo = 1;
  let hi = text.length - 1;
  let best = text.slice(0, 1) + "…";
  while (lo <= hi) {  // the most characters that fit, a third of them from the start
    const n = (lo + hi) >> 1;
    const tail = Math.min(tailShare(n), n);
    const label = text.slice(0, n - tail) + "…" + text.slice(text.length - tail);
    if (width(label) <= room) { best = label; lo = n + 1; } else hi = n - 1;
  }
  return best;
}

function modelInfo(id) {
  return state.models.find((m) => m.id === id) || {};
}

// The deployment's defaults as the greyed placeholder of each empty field.
function showDefaults() {
  const info = modelInfo($("model-a").value);
  const defaults = info.defaults || {};
  document.querySelectorAll("[data-param]").forEach((input) => {
    const v = defaults[input.dataset.param];
    if (v !== undefined && v !== null) input.placeholder = String(v);
  });
  $("model-note").textContent = info.max_model_len ? `context ${info.max_model_len} tokens` : "";
}

// ---- the request ----------------------------------------------------------------------------

// The request for the conversation so far (its last turn: the user's message or tool results).
function buildBody(model, overrides) {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.conversation);
  const body = { model, messages };
  document.querySelectorAll("[data-param]").forEach((input) => {
    const raw = input.value.trim();
    if (raw === "") return;
    const value = Number(raw);
    if (!Number.isFinite(value)) throw new ApiError(0, `${input.dataset.param} must be a number`);
    body[input.dataset.param] = "int" in input.dataset ? Math.trunc(value) : value;
  });
  const stops = $("p-stop").value.split("\n").filter((s) => s.length > 0);
  if (stops.length) body.stop = stops;
  if ($("p-logprobs").checked) {
    body.logprobs = true;
    const top = $("p-top_logprobs").value.trim();
    if (top !== "") body.top_logprobs = Math.trunc(Number(top));
  }
  const format = $("p-format").value;
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") {
    const schema = parseJsonField("p-schema", "The JSON schema", "object");
    if (!schema) throw new ApiError(0, "Write a JSON schema, or pick another response_format");
    body.response_format = { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
  }
  const tools = parseJsonField("p-tools", "tools", "array");
  if (tools && tools.length) body.tools = tools;
  if ($("p-tool_choice").value) body.tool_choice = $("p-tool_choice").value;
  Object.assign(body, parseJsonField("p-extra", "Other fields", "object") || {});
  Object.assign(body, overrides || {});
  return body;
}

// ---- output columns -------------------------------------------------------------------------

function probClass(p) {
  return p >= 0.9 ? "p-high" : p >= 0.6 ? "p-mid" : p >= 0.3 ? "p-low" : "p-min";
}

class Column {
  constructor(letter, body) {
    this.letter = letter;
    this.body = body;
    this.choices = [];
    this.started = performance.now();
    this.firstToken = null;
    this.lastToken = null;
    this.usage = null;
    this.deltas = 0;
    this.status = "streaming";
    const root = this.root = document.createElement("section");
    root.className = "column";
    root.id = `column-${letter}`;
    root.setAttribute("aria-label", `Reply ${letter.toUpperCase()} from ${body.model}`);
    const head = document.createElement("h3");
    head.textContent = (letter === "a" ? "" : "B: ") + body.model;
    root.appendChild(head);
    this.tabs = document.createElement("div");
    this.tabs.className = "tabs";
    this.tabs.setAttribute("role", "tablist");
    this.tabs.setAttribute("aria-label", "Choices");
    root.appendChild(this.tabs);
    this.panels = document.createElement("div");
    root.appendChild(this.panels);
    this.error = document.createElement("p");
    this.error.className = "error";
    this.error.id = `error-${letter}`;
    this.error.setAttribute("role", "alert");
    this.error.hidden = true;
    root.appendChild(this.error);
    this.stats = document.createElement("p");
    this.stats.className = "stats";
    this.stats.id = `stats-${letter}`;
    this.stats.setAttribute("aria-live", "polite");
    root.appendChild(this.stats);
    root.dataset.status = "streaming";
    root.setAttribute("aria-busy", "true");
    this.choice(0);
  }

  choice(index) {
    while (this.choices.length <= index) {
      const i = this.choices.length;
      const tab = document.createElement("button");
      tab.type = "button";
      tab.setAttribute("role", "tab");
      tab.id = `tab-${this.letter}-${i}`;
      tab.textContent = `Choice ${i + 1}`;
      tab.setAttribute("aria-controls", `out-${this.letter}-${i}`);
      tab.setAttribute("aria-selected", i === 0 ? "true" : "false");
      tab.tabIndex = i === 0 ? 0 : -1;
      this.tabs.appendChild(tab);
      const panel = document.createElement("div");
      panel.className = "reply";
      panel.id = `out-${this.letter}-${i}`;
      panel.setAttribute("role", "tabpanel");
      panel.setAttribute("aria-labelledby", tab.id);
      panel.setAttribute("tabindex", "0");
      panel.hidden = i !== 0;
      panel.dataset.updates = "0";
      this.panels.appendChild(panel);
      this.choices.push({ text: "", toolCalls: [], finish: null, panel, tab });
      this.tabs.hidden = this.choices.length < 2;
      initTabs(this.tabs);
    }
    return this.choices[index];
  }

  onChunk(chunk) {
    if (chunk.usage) this.usage = chunk.usage;
    for (const c of chunk.choices || []) {
      const choice = this.choice(c.index || 0);
      const delta = c.delta || {};
      const now = performance.now();
      if (delta.content) {
        if (this.firstToken === null) this.firstToken = now;
        this.lastToken = now;
        choice.text += delta.content;
        this.appendText(choice, delta.content, c.logprobs);
      }
      for (const call of delta.tool_calls || []) {
        if (this.firstToken === null) this.firstToken = now;
        this.lastToken = now;
        const slot = choice.toolCalls[call.index || 0] ||= { id: call.id, name: "", arguments: "" };
        if (call.function && call.function.name) slot.name += call.function.name;
        if (call.function && call.function.arguments) slot.arguments += call.function.arguments;
        this.renderToolCalls(choice);
      }
      if (c.finish_reason) choice.finish = c.finish_reason;
    }
  }

  appendText(choice, text, logprobs) {
    const span = document.createElement("span");
    span.textContent = text;
    const tokens = logprobs && logprobs.content;
    if (tokens && tokens.length) {
      // One delta is usually one token: coloured by its least likely token, the details on hover.
      const p = Math.min(...tokens.map((t) => Math.exp(t.logprob)));
      span.className = "tok " + probClass(p);
      span.title = tokens.map((t) => {
        const alts = (t.top_logprobs || []).map((a) => `${JSON.stringify(a.token)} ${(Math.exp(a.logprob) * 100).toFixed(1)}%`);
        return `${JSON.stringify(t.token)}: p=${(Math.exp(t.logprob) * 100).toFixed(1)}%` +
          ` (logprob ${t.logprob.toFixed(3)})` + (alts.length ? "\ntop: " + alts.join(", ") : "");
      }).join("\n");
      span.dataset.p = p.toFixed(4);
    }
    choice.panel.appendChild(span);
    this.deltas += 1;
    choice.panel.dataset.updates = String(Number(choice.panel.dataset.updates) + 1);
  }

  renderToolCalls(choice) {
    let pre = choice.panel.querySelector("pre.tool-calls");
    if (!pre) {
      pre = document.createElement("pre");
      pre.className = "tool-calls";
      choice.panel.appendChild(pre);
    }
    pre.textContent = choice.toolCalls.map((t) => `tool call ${t.name}(${t.arguments})`).join("\n");
  }

  finish(status, error) {
    this.status = status;
    this.root.dataset.status = status;
    this.root.setAttribute("aria-busy", "false");
    if (error) {
      this.error.textContent = error;
      this.error.hidden = false;
    }
    const parts = [];
    if (this.firstToken !== null) parts.push(`TTFT ${Math.round(this.firstToken - this.started)} ms`);
    const tokens = this.usage ? this.usage.completion_tokens : null;
    if (tokens && tokens > 1 && this.lastToken > this.firstToken) {
      parts.push(`${((tokens - 1) / ((this.lastToken - this.firstToken) / 1000)).toFixed(1)} tok/s`);
    }
    if (tokens !== null) parts.push(`${tokens} tokens`);
    const reasons = this.choices.map((c) => c.finish).filter(Boolean);
    if (reasons.length) parts.push("finish: " + [...new Set(reasons)].join(", "));
    if (status === "stopped") parts.push("stopped");
    this.stats.textContent = parts.join(" · ");
  }

  selected() {
    return this.choices.find((c) => c.tab.getAttribute("aria-selected") === "true") || this.choices[0];
  }
}

async function run(column) {
  const controller = new AbortController();
  state.controllers.push(controller);
  try {
    await streamChat(column.body, { signal: controller.signal, onChunk: (chunk) => column.onChunk(chunk) });
    column.finish("done");
  } catch (e) {
    if (e.name === "AbortError") column.finish("stopped");
    else column.finish("error", e.describe ? e.describe() : String(e));
  }
}

// ---- conversation ---------------------------------------------------------------------------

function renderTranscript() {
  const list = $("transcript");
  list.textContent = "";
  const shown = state.lastInOutputs ? state.conversation.slice(0, -1) : state.conversation;
  for (const m of shown) {
    const item = document.createElement("li");
    item.className = "turn " + m.role;
    const who = document.createElement("span");
    who.className = "role";
    who.textContent = m.role;
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = m.content || (m.tool_calls ? m.tool_calls.map((t) =>
      `tool call ${t.function.name}(${t.function.arguments})`).join("\n") : "");
    item.append(who, text);
    list.appendChild(item);
  }
}

async function send(event) {
  event.preventDefault();
  if (state.controllers.length) return;
  const text = $("composer-input").value.trim();
  if (!text) { $("composer-input").focus(); return; }
  await generate(text);
}

// The results of the tool calls the last reply made, as `tool` messages; then the model goes on
// from them (no new user message).
async function sendToolResults(event) {
  event.preventDefault();
  if (state.controllers.length || !state.pendingCalls.length) return;
  const results = state.pendingCalls.map((call, i) => ({ role: "tool", tool_call_id: call.id,
    content: $(`tool-result-${i}`).value }));
  const empty = results.findIndex((r) => !r.content.trim());
  if (empty >= 0) {
    showBanner(`Enter the result of ${state.pendingCalls[empty].name} (the tool's output, e.g. JSON)`);
    $(`tool-result-${empty}`).focus();
    return;
  }
  await generate(null, results);
}

// One turn: `text` is the user's message (null: continue after `toolResults`).
async function generate(text, toolResults = []) {
  let bodies;
  const added = text ? [{ role: "user", content: text }] : toolResults;
  try {
    state.conversation.push(...added);
    bodies = [buildBody($("model-a").value)];
    if ($("compare").checked) {
      bodies.push(buildBody($("model-b").value, parseJsonField("overrides-b", "Fields for B", "object")));
    }
    for (const b of bodies) if (!b.model) throw new ApiError(0, "No model to send to: enter a key that may use one");
  } catch (e) {
    state.conversation.splice(state.conversation.length - added.length, added.length);
    showBanner(e.describe ? e.describe() : String(e));
    return;
  }
  showBanner("");
  for (const b of bodies) b.stream_options = { include_usage: true };
  state.lastInOutputs = false;
  showToolResults([]);
  renderTranscript();
  if (text) $("composer-input").value = "";
  const outputs = $("outputs");
  outputs.textContent = "";
  outputs.classList.toggle("two", bodies.length > 1);
  const columns = bodies.map((b, i) => new Column(i === 0 ? "a" : "b", b));
  columns.forEach((c) => outputs.appendChild(c.root));
  $("send").disabled = true;
  $("stop").disabled = false;
  document.body.dataset.busy = "true";
  await Promise.all(columns.map(run));
  state.controllers = [];
  $("send").disabled = false;
  $("stop").disabled = true;
  document.body.dataset.busy = "false";
  // Column A's shown choice continues the conversation (also a stopped, partial one).
  const a = columns[0];
  const choice = a.selected();
  if (a.status !== "error" && (choice.text || choice.toolCalls.length)) {
    const turn = { role: "assistant", content: choice.text || null };
    if (choice.toolCalls.length) {
      turn.tool_calls = choice.toolCalls.map((t) => ({ id: t.id, type: "function",
        function: { name: t.name, arguments: t.arguments } }));
    }
    state.conversation.push(turn);
    state.lastInOutputs = true;
    showToolResults(choice.toolCalls);
  } else {
    // a failed turn is not part of the conversation: edit and resend
    state.conversation.splice(state.conversation.length - added.length, added.length);
    if (text) $("composer-input").value = text;
    else showToolResults(state.retryCalls, toolResults);
    state.lastInOutputs = false;
  }
  renderTranscript();
  if ($("code-panel").hidden === false) renderCode();
}

// The form for the results of the reply's tool calls (hidden when it made none).
function showToolResults(calls, previous = []) {
  state.retryCalls = state.pendingCalls.length ? state.pendingCalls : calls;
  state.pendingCalls = calls;
  const list = $("tool-results-list");
  list.textContent = "";
  calls.forEach((call, i) => {
    const field = document.createElement("div");
    field.className = "field";
    const label = document.createElement("label");
    label.htmlFor = `tool-result-${i}`;
    label.textContent = `Result of ${call.name}(${call.arguments})`;
    const input = document.createElement("textarea");
    input.id = `tool-result-${i}`;
    input.rows = 2;
    input.spellcheck = false;
    input.placeholder = '{"temperature": 21, "unit": "C"}';
    input.value = previous[i] ? previous[i].content : "";
    field.append(label, input);
    list.appendChild(field);
  });
  $("tool-results").hidden = calls.length === 0;
}

function stop() {
  for (const c of state.controllers) c.abort();
}

// ---- view code ------------------------------------------------------------------------------

function shellQuote(s) {
  return "'" + s.replace(/'/g, "'\\''") + "'";
}

// A JSON value as a Python literal (True/False/None), indented like json.dumps(indent=4).
function py(value, indent = 0) {
  const pad = " ".repeat(indent + 4);
  const end = " ".repeat(indent);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return "[\n" + value.map((v) => pad + py(v, indent + 4)).join(",\n") + ",\n" + end + "]";
  }
  const keys = Object.keys(value);
  if (!keys.length) return "{}";
  return "{\n" + keys.map((k) => pad + JSON.stringify(k) + ": " + py(value[k], indent + 4)).join(",\n") + ",\n" + end + "}";
}

function codeFor(lang, body) {
  const origin = window.location.origin;
  const masked = maskKey(getKey()) || "sk-...";
  const json = JSON.stringify(body, null, 2);
  if (lang === "json") return json;
  if (lang === "curl") {
    return `# export LMSERVE_API_KEY=${masked}\ncurl ${origin}/v1/chat/completions -N \\\n` +
      `  -H "Authorization: Bearer $LMSERVE_API_KEY" \\\n  -H "Content-Type: application/json" \\\n` +
      `  -d ${shellQuote(json)}`;
  }
  if (lang === "python") {
    const named = Object.keys(body).filter((k) => OPENAI_FIELDS.has(k));
    const extra = Object.fromEntries(Object.entries(body).filter(([k]) => !OPENAI_FIELDS.has(k)));
    let args = named.map((k) => `    ${k}=${py(body[k], 4)},`).join("\n");
    if (Object.keys(extra).length) args += `\n    extra_body=${py(extra, 4)},`;
    return `import os\n\nfrom openai import OpenAI\n\n# LMSERVE_API_KEY=${masked}\n` +
      `client = OpenAI(base_url="${origin}/v1", api_key=os.environ["LMSERVE_API_KEY"])\n` +
      `stream = client.chat.completions.create(\n${args}\n)\nfor chunk in stream:\n` +
      `    if chunk.choices and chunk.choices[0].delta.content:\n` +
      `        print(chunk.choices[0].delta.content, end="", flush=True)\nprint()\n`;
  }
  return `import OpenAI from "openai";\n\n// LMSERVE_API_KEY=${masked}\n` +
    `const client = new OpenAI({ baseURL: "${origin}/v1", apiKey: process.env.LMSERVE_API_KEY });\n` +
    `const stream = await client.chat.completions.create(${json});\n` +
    `for await (const chunk of stream) {\n  process.stdout.write(chunk.choices[0]?.delta?.content ?? "");\n}\n`;
}

function renderCode() {
  let body;
  try {
    body = buildBody($("model-a").value);
    // what Send would post: the message being written is the request's last
    const text = $("composer-input").value.trim();
    if (text) body.messages.push({ role: "user", content: text });
  } catch (e) {
    $("code").textContent = e.describe ? e.describe() : String(e);
    return;
  }
  body.stream = true;
  body.stream_options = { include_usage: true };
  $("code").textContent = codeFor(state.codeLang, body);
  $("code").dataset.lang = state.codeLang;
}

function toggleCode() {
  const panel = $("code-panel");
  panel.hidden = !panel.hidden;
  $("view-code").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden) renderCode();
}

// ---- wiring ---------------------------------------------------------------------------------

function init() {
  $("api-key").value = getKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setKey($("api-key").value.trim());
    loadModels();
  });
  $("model-a").addEventListener("change", () => { showDefaults(); fitModelLabels(); });
  $("model-b").addEventListener("change", fitModelLabels);
  $("compare").addEventListener("change", () => { $("compare-fields").hidden = !$("compare").checked; fitModelLabels(); });
  $("p-format").addEventListener("change", () => {
    const schema = $("p-format").value === "json_schema";
    $("schema-field").hidden = !schema;
    if (schema && !$("p-schema").value.trim()) $("p-schema").value = JSON.stringify(SCHEMA_EXAMPLE, null, 2);
  });
  $("tools-example").addEventListener("click", () => {
    $("p-tools").value = JSON.stringify(TOOLS_EXAMPLE, null, 2);
  });
  $("composer").addEventListener("submit", send);
  $("tool-results").addEventListener("submit", sendToolResults);
  window.addEventListener("resize", fitModelLabels);
  $("composer-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("composer").requestSubmit();
  });
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controllers.length) stop(); });
  $("clear").addEventListener("click", () => {
    state.conversation = [];
    state.lastInOutputs = false;
    state.pendingCalls = [];
    showToolResults([]);
    $("outputs").textContent = "";
    renderTranscript();
  });
  $("view-code").addEventListener("click", toggleCode);
  const codeTabs = document.querySelector("#code-panel [role=tablist]");
  initTabs(codeTabs, (tab) => { state.codeLang = tab.dataset.lang; renderCode(); });
  selectTab(codeTabs, $("code-tab-curl"));
  $("copy-code").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("code").textContent));
  document.querySelectorAll(".params input, .params select, .params textarea, #system-prompt").forEach((input) => {
    input.addEventListener("input", () => { if (!$("code-panel").hidden) renderCode(); });
  });
  loadModels();
}

init();
