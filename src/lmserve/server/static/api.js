// The public API as the pages use it: the key (kept in this tab's sessionStorage only), JSON
// calls that turn the API's error body into an ApiError carrying its message, and a streamed
// chat completion read from the SSE body as it arrives.

const KEY_ITEM = "lmserve.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

// "sk-abc...xyz": enough to tell keys apart, never the whole key on screen.
export function maskKey(key) {
  if (!key) return "";
  return key.length <= 10 ? key.slice(0, 3) + "..." : key.slice(0, 6) + "..." + key.slice(-4);
}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }

  // What the page shows: the status and the API's own message.
  describe() {
    return this.status ? `${this.status}: ${this.message}` : this.message;
  }
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = getKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

// The message of an error body in the API's shape ({"error": {"message"}, "message"}), else the text.
async function errorOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const err = body.error || {};
    return new ApiError(response.status, err.message || body.message || text, err.code);
  } catch (_) {
    return new ApiError(response.status, text.trim() || response.statusText || "request failed");
  }
}

export async function apiJson(path, options = {}) {
  const init = { method: options.method || "GET", headers: authHeaders(options.headers), signal: options.signal };
  if (options.body !== undefined) {
    init.body = JSON.stringify(options.body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "the server cannot be reached: " + e.message);
  }
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

export async function apiText(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw await errorOf(response);
  return response.text();
}

// POST /v1/chat/completions with stream: true. `onChunk(chunk)` gets each parsed
// chat.completion.chunk as soon as its event is complete; resolves when [DONE] arrives, rejects
// with an ApiError for an error status or an error event inside the stream, and with an
// AbortError when `signal` aborts (the server then ends the request and frees its cache).
export async function streamChat(body, { signal, onChunk }) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(Object.assign({}, body, { stream: true })),
      signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "the server cannot be reached: " + e.message);
  }
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        const err = chunk.error;
        // after the 200: the event carries the message (its `code` is the platform's number, not a status)
        throw new ApiError(0, err.message || "the stream failed", err.code);
      }
      onChunk(chunk);
    }
  }
  throw new ApiError(0, "the stream ended before [DONE] (connection lost)");
}
