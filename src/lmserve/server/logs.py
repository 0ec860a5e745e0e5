"""Server logging: text (coloured on a terminal) or JSON lines, one line per request, and a
periodic stats line while the server is busy (as vLLM prints)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from typing import Any

stats_log = logging.getLogger("lmserve.stats")

# Probe and scrape routes: not logged unless asked (an orchestrator calls them every few seconds).
PROBE_PATHS = frozenset({"/health", "/health/ready", "/health/live", "/metrics"})

_COLOURS = {"DEBUG": "\033[2m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[31m"}
_RESET = "\033[0m"


# Characters that let text in a log line pose as something else: C0/C1 controls (a newline starts
# a forged record, ESC drives the terminal that tails the log, NUL cuts it for C tools), DEL, the
# Unicode line and paragraph separators, and the bidirectional overrides that reorder what a
# reader sees. Log messages carry client text (paths, model ids, names), so each one is escaped.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match) -> str:
    c = match.group()
    return _NAMED_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_controls(text: str) -> str:
    """`text` on one line with nothing a terminal acts on: `\\n`, `\\r`, `\\t`, `\\x1b`, `\\u2028`
    as visible escapes (what the JSON format writes for the same characters)."""
    return _UNSAFE.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, one line per record: the message is escaped (it may hold
    client text). A traceback follows on lines of its own, each indented, so only a record's first
    line ever starts at the margin and no exception message can pass for a record."""

    def __init__(self, colour: bool):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
        self.colour = colour

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        exc_info, exc_text, stack_info = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None  # formatted below, indented
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = exc_info, exc_text, stack_info
        if self.colour:
            colour = _COLOURS.get(record.levelname, "")
            line = line.replace(record.levelname, f"{colour}{record.levelname}{_RESET}", 1)
        extra = [self.formatException(exc_info) if exc_info else exc_text, stack_info and self.formatStack(stack_info)]
        for block in filter(None, extra):
            line += "".join("\n    " + escape_controls(part) for part in block.splitlines())
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line; structured fields a caller passed as `extra={"fields": {...}}`
    become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        # json.dumps escapes C0 controls; DEL, C1 controls and the Unicode separators it leaves as
        # they are (valid JSON, but a terminal acts on them), so they are escaped here too.
        return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(out, ensure_ascii=False, default=str))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter(colour=sys.stderr.isatty()))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own access log is off (ours has tokens and timing); its errors come through here.
    logging.getLogger("uvicorn.access").disabled = True


def access_line(fields: dict[str, Any]) -> str:
    """The request line in text form: `POST /v1/chat/completions 200 model=... prompt=12 ...`."""
    parts = [f"{fields['method']} {fields['path']} {fields['status']}"]
    for key in ("model", "prompt_tokens", "completion_tokens", "ttft_ms", "tok_per_s", "latency_ms", "request_id"):
        value = fields.get(key)
        if value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class TokenTally:
    """Tokens per model for the stats line: finished requests' totals plus what the requests in
    flight have produced so far, so a long generation shows its speed while it runs."""

    def __init__(self):
        self.finished: dict[str, list[int]] = {}  # model -> [prompt, completion]
        self.active: dict[str, object] = {}  # request id -> ChatJob, admitted and not finished

    def start(self, job) -> None:
        self.active[job.request_id] = job

    def finish(self, job) -> None:
        self.active.pop(job.request_id, None)
        counts = self.finished.setdefault(job.model, [0, 0])
        counts[0] += job.prompt_tokens
        counts[1] += job.completion_tokens

    def totals(self, model: str) -> tuple[int, int]:
        prompt, completion = self.finished.get(model, (0, 0))
        for job in self.active.values():
            if job.model == model:
                prompt += job.prompt_tokens
                completion += job.completion_tokens
        return prompt, completion


async def stats_loop(backends: dict, tally: TokenTally, interval_s: float) -> None:
    """Every `interval_s`, one line per model that is busy or was busy since the last line."""
    last: dict[str, tuple[int, int]] = {}
    last_t = time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        elapsed, last_t = now - last_t, now
        for model, backend in list(backends.items()):
            s = backend.stats()
            if not s:
                continue  # a backend without engine gauges (an upstream)
            prompt, gen = tally.totals(model)
            prompt0, gen0 = last.get(model, (0, 0))
            last[model] = (prompt, gen)
            if not (s["running"] or s["waiting"] or gen != gen0 or prompt != prompt0):
                continue  # idle: nothing to say
            queries = s["prefix_cache_queries"]
            fields = {"model": model, "running": s["running"], "waiting": s["waiting"],
                      "prompt_tok_per_s": round((prompt - prompt0) / elapsed, 1),
                      "gen_tok_per_s": round((gen - gen0) / elapsed, 1),
                      "kv_cache_usage_pct": round(100 * s["kv_cache_usage"], 1),
                      "prefix_cache_hit_pct": round(100 * s["prefix_cache_hits"] / queries, 1) if queries else 0.0}
            stats_log.info("stats " + " ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})
