"""Security checks against a real `lmserve serve` (issue 30), from the outside as an attacker
would try them:

- the access log: client text with CR, LF, ESC, NUL in every field that reaches a log line
  (path, query string, header values, model and account names) leaves exactly one line per
  request, with the characters as visible escapes;
- the headers: every response says nosniff and refuses framing; every HTML response carries the
  page CSP; redirects never point at the Host a client sent; the pages' static second path is gone;
- in Chromium, with every host but this machine unresolvable (no network): a page on another
  origin cannot frame any of the pages; /docs (Swagger UI) and /redoc render the API from local
  files only; XSS payloads in account, key and model names, in forced model output and in an API
  error message are shown as text, never run or parsed as HTML.

One server and one browser for the module (Chromium and its driver as for test_web_ui.py)."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from lmserve.server.logs import JSONFormatter, TextFormatter

from .test_web_ui import _find, by_id, fill, open_page, send_and_wait, wait_for

BOOT_KEY = "sk-sec-boot"
ADMIN_KEY = "sk-sec-admin"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PAGES = ("/playground", "/console", "/docs", "/redoc")


def payload(tag: str) -> str:
    """Markup that, parsed as HTML anywhere, leaves an element with an `xss-` id in the DOM (and
    would run script if the CSP let it). Short: the forced model output generates it token by token."""
    return f"<img src=x id=xss-{tag} onerror=alert(1)>"


XSS_MODEL = "xss/" + payload("model")  # a deployment id; served by an upstream nobody answers for

CONFIG = f"""\
server:
  api_keys: ["{BOOT_KEY}"]
  stats_interval_s: 0
platform:
  admin_keys: ["{ADMIN_KEY}"]
models:
  - id: {MODEL}
    path: {MODEL}
    dtype: float32
    engine: {{num_kv_blocks: 64, max_num_seqs: 4}}
  - id: {json.dumps(XSS_MODEL)}
    upstream: {{base_urls: ["http://127.0.0.1:9/v1"]}}
"""


@pytest.fixture(scope="module")
def sec(servers, tmp_path_factory):
    srv = servers.launch(tmp_path_factory.mktemp("lmserve-sec"), CONFIG)
    srv.http = httpx.Client(base_url=srv.url, timeout=60.0)
    yield srv
    srv.http.close()
    servers.stop(srv)


@pytest.fixture(scope="module")
def offline_browser():
    """Chromium that can reach 127.0.0.1 and nothing else: every other host name fails to
    resolve, as on a machine without network (a CDN script would not load)."""
    chromium = _find("LMSERVE_CHROMIUM", ("chromium", "chromium-browser", "google-chrome"))
    driver_path = _find("LMSERVE_CHROMEDRIVER", ("chromedriver",))
    if not chromium or not driver_path:
        pytest.fail("the browser tests need Chromium and its driver: apt-get install chromium chromium-driver "
                    "(.ci/run installs them), or set LMSERVE_CHROMIUM / LMSERVE_CHROMEDRIVER", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def admin(key: str = ADMIN_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------------------------------
# the log


_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
_RAW_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
FORGED = "2026-12-04 15:20:00 INFO lmserve.access: POST /admin/keys 200 request_id=forged"


def _raw_request(srv, head: bytes, body: bytes = b"") -> bytes:
    """One request written byte for byte (no client library would send these), its answer."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(head + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def _new_log(srv, start: int, lines: int) -> list[str]:
    """The server's log after byte `start`, once it has `lines` lines (and a moment more, so an
    extra line would show)."""
    deadline = time.monotonic() + 20
    while True:
        text = srv.log_path.read_bytes()[start:].decode("utf-8", errors="replace")
        if text.count("\n") >= lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    return srv.log_path.read_bytes()[start:].decode("utf-8", errors="replace").splitlines(keepends=True)


def test_client_text_never_breaks_a_log_line(sec):
    evil = "\r\n" + FORGED + "\x1b[31m\x00\u2028"
    quoted = "".join(f"%{b:02x}" for b in evil.encode())  # the path and query as a client sends them
    chat = json.dumps({"model": "m" + evil, "messages": [{"role": "user", "content": evil}]}).encode()
    key = json.dumps({"account": "acct" + evil, "name": "key" + evil}).encode()
    requests = [
        (f"GET /x{quoted} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode(), b""),  # 404, path logged
        (f"GET /v1/models?q={quoted} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode(), b""),  # 401
        # ESC and NUL in header values: h11 refuses the NUL (uvicorn logs one line of its own)
        (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nUser-Agent: x\x1b[31my\r\nX-Forwarded-For: \x1b]0;t\x07\r\n"
         b"Connection: close\r\n\r\n", b""),
        (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer \x00\x1b\r\nConnection: close\r\n\r\n", b""),
        (f"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {BOOT_KEY}\r\n"
         f"Content-Type: application/json\r\nContent-Length: {len(chat)}\r\nConnection: close\r\n\r\n".encode(), chat),
        (f"POST /admin/keys HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
         f"Content-Type: application/json\r\nContent-Length: {len(key)}\r\nConnection: close\r\n\r\n".encode(), key),
    ]
    start = sec.log_path.stat().st_size
    statuses = []
    for head, body in requests:
        statuses.append(_raw_request(sec, head, body).split(b" ", 2)[1])
    assert statuses == [b"404", b"401", b"401", b"400", b"400", b"200"], statuses
    lines = _new_log(sec, start, len(requests))
    assert len(lines) == len(requests), "".join(lines)
    for line in lines:
        assert line.endswith("\n") and _RECORD_START.match(line), repr(line)
        assert not _RAW_CONTROLS.search(line), repr(line)
    path_line = lines[0]
    assert "GET /x\\r\\n" + FORGED + "\\x1b[31m\\x00\\u2028 404" in path_line
    assert sum(FORGED in line for line in lines) == 1  # as text inside the one line, never a line of its own


def test_text_and_json_formats_escape_messages_and_tracebacks():
    """What any log call writes (uvicorn's, a backend's error with a client's text in it): the
    text format keeps a record on its first line and indents a traceback under it; the JSON
    format also escapes the controls json.dumps leaves (DEL, C1, the Unicode separators)."""
    record = logging.LogRecord("lmserve.test", logging.ERROR, __file__, 1, "generation failed: %s",
                               ("bad\n" + FORGED + "\x1b\x9b\u2028",), None)
    try:
        raise ValueError("template error\n" + FORGED)
    except ValueError:
        record.exc_info = sys.exc_info()
    text = TextFormatter(colour=False).format(record)
    first, *rest = text.split("\n")
    assert first.endswith("generation failed: bad\\n" + FORGED + "\\x1b\\x9b\\u2028")
    assert rest and all(line.startswith("    ") for line in rest), text  # the traceback, indented
    assert not _RAW_CONTROLS.search(text)
    line = JSONFormatter().format(record)
    assert "\n" not in line and not _RAW_CONTROLS.search(line)
    assert json.loads(line)["message"] == "generation failed: bad\n" + FORGED + "\x1b\x9b\u2028"


# ---------------------------------------------------------------------------------------------
# the headers


def _check_headers(r: httpx.Response) -> None:
    what = f"{r.request.method} {r.request.url.raw_path.decode()} -> {r.status_code}"
    assert r.headers.get("x-content-type-options") == "nosniff", what
    assert r.headers.get("x-frame-options") == "DENY", what
    assert r.headers.get("referrer-policy") == "no-referrer", what
    csp = r.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp, what
    if r.headers.get("content-type", "").startswith("text/html"):
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["script-src"] == "'self'", what  # no inline script, no CDN, on any page
        assert directives["default-src"] == "'self'" and directives["object-src"] == "'none'", what
        assert not re.search(r"https?:|\*", csp), (what, csp)  # no other origin allowed anywhere


def test_every_response_carries_the_security_headers(sec):
    spec = sec.http.get("/openapi.json").json()
    plain = [p for p, ops in spec["paths"].items() if "get" in ops and "{" not in p]
    assert "/v1/models" in plain and "/metrics" in plain
    html = 0
    for path in [*PAGES, *plain, "/openapi.json", "/ui/app.css", "/ui/playground.js", "/docs/assets/swagger-ui.css",
                 "/docs/assets/swagger-ui-bundle.js", "/docs/assets/redoc.standalone.js", "/nope", "/ui/nope.js"]:
        for key in (None, BOOT_KEY, ADMIN_KEY):
            r = sec.http.get(path, headers=admin(key) if key else {})
            _check_headers(r)
            html += r.headers.get("content-type", "").startswith("text/html")
    assert html == 3 * len(PAGES)
    errors = [sec.http.post("/v1/chat/completions", content=b"{", headers=admin(BOOT_KEY)),  # 400
              sec.http.delete("/v1/models", headers=admin(BOOT_KEY)),  # 405
              sec.http.post("/admin/keys", json={"account": "x"}, headers=admin(BOOT_KEY)),  # 403
              sec.http.get("/v1/models", headers={"X-Big": "x" * 20000}),  # 431
              sec.http.head("/playground"), sec.http.options("/v1/models")]
    assert [r.status_code for r in errors][:4] == [400, 405, 403, 431]
    for r in errors:
        _check_headers(r)
    with sec.http.stream("POST", "/v1/chat/completions", headers=admin(BOOT_KEY),
                         json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                               "stream": True}) as r:
        r.read()
        assert r.status_code == 200
        _check_headers(r)


def test_docs_pages_load_only_local_files(sec):
    for page in ("/docs", "/redoc"):
        html = sec.http.get(page).text
        sources = re.findall(r'(?:src|href)="([^"]*)"', html)
        assert sources and all(s.startswith("/") or s == "data:," for s in sources), (page, sources)
        for source in sources:
            if source.startswith("/"):
                assert sec.http.get(source).status_code == 200, source


def test_the_pages_have_one_path_each(sec):
    """The static mount serves scripts and styles, not the pages: /ui/playground.html and
    /ui/console.html were a second way to a page."""
    for path in ("/ui/playground.html", "/ui/console.html", "/ui/docs.html", "/ui/redoc.html", "/ui/PLAYGROUND.HTML",
                 "/ui/playground.html/", "/ui/./console.html"):
        r = sec.http.get(path)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", path
    assert sec.http.get("/ui/playground.js").status_code == 200


def test_redirects_never_use_the_clients_host(sec):
    cases = {"/ui": "/ui/", "/": "/playground", "//evil.example/ui": None}
    for path, expected in cases.items():
        for host in ("evil.example", "evil.example:443/x", "127.0.0.1"):
            answer = _raw_request(sec, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            location = re.search(r"(?im)^location: ([^\r\n]*)", head)
            if expected is None:  # a path that starts like a URL on another host
                assert location is None or location.group(1).startswith("/") and not \
                    location.group(1).startswith("//"), head
                continue
            assert location and location.group(1) == expected, (path, host, head)


# ---------------------------------------------------------------------------------------------
# in the browser


class _Attacker(BaseHTTPRequestHandler):
    """Another origin: a page that frames one of the server's pages, or (the control) a page of
    a third origin that sets no protection."""

    target = ""

    def do_GET(self):  # noqa: N802 - the http.server hook
        if self.path.startswith("/frame"):
            src = self.path.split("?src=", 1)[1]
            body = f'<!doctype html><iframe id="f" src="{src}" width="800" height="600"></iframe>'
        else:
            body = '<!doctype html><body data-framed-page="yes">plain page</body>'
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def other_origins():
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Attacker) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def _framed(driver, top: str, src: str) -> tuple[str, dict]:
    """Load `src` in an iframe of a page on origin `top`; the URL the frame ended on and what
    its document shows (a blocked frame holds Chromium's error page instead of the page)."""
    driver.get(f"{top}/frame?src={src}")
    frame = wait_for(driver, lambda d: d.find_element("id", "f"), "the iframe")
    time.sleep(1.0)  # the framed page's scripts (if it loads) fill the page within this
    driver.switch_to.frame(frame)
    try:
        return driver.execute_script("return location.href"), driver.execute_script(
            "return {body: document.body ? {...document.body.dataset} : {}, text: document.body ? "
            "document.body.innerText.slice(0, 200) : ''}")
    finally:
        driver.switch_to.default_content()


def test_no_other_origin_can_frame_any_page(sec, offline_browser, other_origins):
    d = offline_browser
    attacker, third = other_origins
    # the control: a page without protection, framed across origins, loads and shows itself
    url, shown = _framed(d, attacker, f"{third}/plain")
    assert url == f"{third}/plain" and shown["body"] == {"framedPage": "yes"}, (url, shown)
    d.get_log("browser")
    for page in (*PAGES, "/ui/playground.html", "/ui/console.html", "/v1/models", "/nope"):
        url, shown = _framed(d, attacker, sec.url + page)
        assert url.startswith("chrome-error://"), (page, url, shown)
        assert shown["body"] == {} and sec.url not in url, (page, shown)
        refusals = [e["message"] for e in d.get_log("browser") if "frame-ancestors" in e["message"]]
        assert refusals, page  # Chromium said why


def _no_foreign_loads(driver, origin: str) -> list[str]:
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith(arguments[0]))",
        origin)


def test_swagger_ui_renders_the_chat_operation_offline(sec, offline_browser):
    d = offline_browser
    d.get(sec.url + "/docs")
    summary = wait_for(d, lambda d: next((e for e in d.find_elements("css selector", ".opblock-summary-path")
                                          if e.text == "/v1/chat/completions"), None), "the chat operation", 60)
    summary.click()
    block = d.find_element("css selector", "#operations-default-chat_completions_v1_chat_completions_post")
    wait_for(d, lambda d: "messages" in block.text and "Request body" in block.text, "the request body schema", 30)
    assert d.execute_script("return typeof SwaggerUIBundle") == "function"
    assert _no_foreign_loads(d, sec.url) == []
    bad = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not bad, bad  # no CSP violation, no script error, nothing that failed to load


def test_redoc_renders_offline(sec, offline_browser):
    d = offline_browser
    d.get(sec.url + "/redoc")
    wait_for(d, lambda d: "Chat Completions" in d.find_element("tag name", "body").text, "the ReDoc menu", 60)
    wait_for(d, lambda d: "messages" in d.find_element("tag name", "body").text, "the request schema", 30)
    # ReDoc's sidebar footer asks for its logo from the vendor's CDN, whatever the options: the CSP
    # refuses it (the one foreign request, never sent). Anything else severe is a failure.
    logo = "https://cdn.redoc.ly/redoc/logo-mini.svg"
    assert _no_foreign_loads(d, sec.url) in ([], [logo])
    log = d.get_log("browser")
    bad = [e for e in log if e["level"] == "SEVERE" and not (logo in e["message"] and "violates" in e["message"])]
    assert not bad, bad
    if _no_foreign_loads(d, sec.url):
        assert any(logo in e["message"] and "Content Security Policy" in e["message"] for e in log), log


def _assert_shown_as_text(driver, tag: str, where: str) -> None:
    injected = driver.execute_script("return [...document.querySelectorAll('[id^=\"xss-\"]')].map(e => e.id)")
    assert injected == [], f"{where}: markup from the payload became elements: {injected}"
    assert payload(tag) in driver.execute_script("return document.body.textContent"), f"{where}: payload not shown"
    violations = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not violations, violations  # nothing even tried to run


def test_names_from_the_api_are_shown_as_text(sec, offline_browser):
    from selenium.webdriver.support.ui import Select

    d = offline_browser
    r = sec.http.post("/admin/keys", headers=admin(), json={"account": payload("account"), "name": payload("key"),
                                                            "models": [MODEL, XSS_MODEL], "balance": "1"})
    assert r.status_code == 200, r.text
    open_page(d, sec, "/console", ADMIN_KEY)  # the admin tables: account, key and model names
    wait_for(d, lambda d: payload("key") in by_id(d, "keys-table").text, "the keys table")
    assert payload("account") in by_id(d, "accounts-table").text and XSS_MODEL in by_id(d, "keys-table").text
    for tag in ("account", "key", "model"):
        _assert_shown_as_text(d, tag, "console admin tables")
    open_page(d, sec, "/console", r.json()["key"])  # the key's own view: its account's name
    wait_for(d, lambda d: payload("account") in by_id(d, "stat-account").text, "the account")
    _assert_shown_as_text(d, "account", "console account")

    open_page(d, sec, "/playground", BOOT_KEY)
    wait_for(d, lambda d: d.find_element("tag name", "body").get_attribute("data-models") == "2", "the model list")
    # Long ids are abbreviated in the middle to fit; the value and the tooltip hold the whole id.
    assert XSS_MODEL in [o.get_attribute("value") for o in Select(by_id(d, "model-a")).options]
    _assert_shown_as_text(d, "model", "playground models")


def test_model_output_and_api_errors_are_shown_as_text(sec, offline_browser):
    from selenium.webdriver.support.ui import Select

    d = offline_browser
    open_page(d, sec, "/playground", BOOT_KEY)
    wait_for(d, lambda d: d.find_element("tag name", "body").get_attribute("data-models") == "2", "the model list")
    Select(by_id(d, "model-a")).select_by_value(MODEL)
    fill(d, "p-max_tokens", "48")
    Select(by_id(d, "p-format")).select_by_value("json_schema")
    schema = {"type": "object", "properties": {"x": {"const": payload("out")}}, "required": ["x"],
              "additionalProperties": False}
    fill(d, "p-schema", json.dumps(schema))
    fill(d, "composer-input", "Say something.")
    send_and_wait(d)
    shown = by_id(d, "out-a-0").get_attribute("textContent")
    assert json.loads(shown) == {"x": payload("out")}, shown  # the grammar forced exactly the payload
    _assert_shown_as_text(d, "out", "playground reply")

    # an API error that echoes what the client sent: the unknown model's 400 quotes its name
    by_id(d, "clear").click()
    Select(by_id(d, "p-format")).select_by_value("text")
    fill(d, "p-extra", json.dumps({"model": payload("error")}))
    fill(d, "composer-input", "Hi")
    send_and_wait(d, status="error")
    assert by_id(d, "error-a").text.startswith("400: ") and payload("error") in by_id(d, "error-a").text
    _assert_shown_as_text(d, "error", "playground error")
