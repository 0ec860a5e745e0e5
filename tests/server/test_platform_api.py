"""The platform through a real server: keys (admin API and CLI), 401/403, the four rate limits
with Retry-After, token settlement, balances and /v1/user/info, ledger rows for disconnects and
SIGTERM, and Vendor-A upstreams (the suite's main server as the upstream, plus a small
fault-injecting HTTP server for 429, 500, hangs and dropped streams).

One extra `lmserve serve` runs for this module, on the test PostgreSQL and Redis (the direct
store tests cover SQLite too). Its last test stops it with SIGTERM, so keep that one last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from tests.support.platform_services import fresh_postgres_url, redis_url, unique_prefix

API_KEY = "sk-test-key"  # the main test server's key (it is the upstream here)
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BOOT_KEY = "sk-platform-boot"
ADMIN_KEY = "sk-platform-admin"
UP = "Vendor-A/SmolLM2"  # upstream: the main test server (after a dead URL: failover)
PRICE_IN, PRICE_OUT = 2.0, 4.0  # per million tokens


# ---------------------------------------------------------------------------------------------
# a small upstream that fails on purpose, chosen by the upstream model name


class _Faults(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: a drop is a drop
    calls: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        model = body["model"]
        n = _Faults.calls[model] = _Faults.calls.get(model, 0) + 1
        if model == "fault-429":
            return self._json(429, {"error": {"message": "slow down", "type": "rate_limit_error"}},
                              {"retry-after": "7"})
        if model == "fault-500" or (model == "fault-flaky" and n == 1):
            return self._json(500, {"error": {"message": "boom at 0xdeadbeef", "type": "internal"}})
        if model == "fault-400":
            return self._json(400, {"error": {"message": "upstream says max_tokens is too large"}})
        if model == "fault-hang":
            time.sleep(4)
            return self._json(500, {"error": {"message": "too late"}})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        base = {"id": "upstream-id-1", "object": "chat.completion.chunk", "created": 1, "model": model}
        for piece in ("Hello", " from", " upstream"):
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            if model == "fault-drop":
                return  # the connection closes after the first chunk: no finish, no [DONE]
        done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        usage = {**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}
        self.wfile.write(f"data: {json.dumps(done)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture(scope="module")
def faults():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Faults)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


# ---------------------------------------------------------------------------------------------
# the platform server


@pytest.fixture(scope="module")
def plat(server, servers, faults, tmp_path_factory):
    pg = fresh_postgres_url()
    fault_models = "".join(f"""
  - id: Vendor-A/{name}
    upstream: {{base_urls: ["{faults}"], model: {name}, read_timeout: 1.5, retries: 1}}
""" for name in ("fault-429", "fault-500", "fault-flaky", "fault-400", "fault-hang", "fault-drop"))
    config = f"""\
server:
  api_keys: ["{BOOT_KEY}"]
platform:
  database_url: "{pg}"
  redis_url: "{redis_url()}"
  redis_prefix: "{unique_prefix()}"
  admin_keys: ["{ADMIN_KEY}"]
  tiers:
    free: {{rpm: 1000, tpm: 100000}}
models:
  - id: {MODEL}
    path: {MODEL}
    dtype: float32
    engine: {{num_kv_blocks: 128, max_num_seqs: 16}}
    price: {{input: {PRICE_IN}, output: {PRICE_OUT}}}
  - id: {UP}
    upstream:
      base_urls: ["{_dead_url()}", "{server.base_url}"]
      model: {MODEL}
      api_key_env: LMSERVE_TEST_UPSTREAM_KEY
      retries: 1
    price: {{input: {PRICE_IN}, output: {PRICE_OUT}}}
{fault_models}"""
    srv = servers.launch(tmp_path_factory.mktemp("lmserve-platform"), config, LMSERVE_TEST_UPSTREAM_KEY=API_KEY)
    srv.db_url = pg
    srv.http = httpx.Client(base_url=srv.url, timeout=60.0)
    yield srv
    srv.http.close()
    servers.stop(srv)


def admin(plat, method: str, path: str, **kwargs) -> httpx.Response:
    return plat.http.request(method, f"/admin{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)


def new_key(plat, account: str, **fields) -> str:
    """A key on a new account with 10 of granted credit (the test model is priced)."""
    r = admin(plat, "POST", "/keys", json={"account": account, "balance": "10", **fields})
    assert r.status_code == 200, r.text
    return r.json()["key"]


def sdk(plat, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=plat.base_url, max_retries=0, timeout=60.0)


def chat(plat, key: str, content: str = "Hi", **body) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
            "temperature": 0, **body}
    return plat.http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def ledger(plat, where: str = "TRUE", **params) -> list[dict]:
    engine = create_engine(plat.db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(f"SELECT * FROM usage WHERE {where} ORDER BY id"), params).mappings().all()
            return [dict(r) for r in rows]
    finally:
        engine.dispose()


def wait_for_rows(plat, where: str, count: int = 1, timeout: float = 120.0, **params) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = ledger(plat, where, **params)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# keys and auth


def test_keys_lifecycle_through_the_admin_api(plat, checks):
    key = new_key(plat, "acme", name="ci")
    reply = sdk(plat, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=3)
    assert reply.usage.completion_tokens >= 1
    listed = admin(plat, "GET", "/keys", params={"account": "acme"}).json()["data"]
    assert len(listed) == 1 and key.startswith(listed[0]["prefix"].rstrip(".")) and key not in json.dumps(listed)
    r = admin(plat, "POST", f"/keys/{listed[0]['id']}/revoke")
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    body = checks.error_body(chat(plat, key), 401, "authentication_error")
    assert "revoked" in body["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        sdk(plat, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])


def test_admin_api_needs_an_admin_key(plat, checks):
    checks.error_body(plat.http.get("/admin/keys"), 401)
    checks.error_body(plat.http.get("/admin/keys", headers={"Authorization": f"Bearer {BOOT_KEY}"}), 403)
    checks.error_body(admin(plat, "POST", "/keys", json={"account": "x", "rpm": "many"}), 400, param="rpm")
    checks.error_body(admin(plat, "POST", "/keys", json={"account": "x", "expires": "someday"}), 400)
    checks.error_body(admin(plat, "POST", "/accounts/nobody/topup", json={"amount": "1"}), 404)
    checks.error_body(admin(plat, "POST", "/accounts/acme/topup", json={"amount": "-1"}), 400, param="amount")
    checks.error_body(admin(plat, "POST", "/keys/999999/revoke"), 404)


def test_expired_key_is_401(plat, checks):
    key = new_key(plat, "late", expires="2020-01-01")
    assert "expired" in checks.error_body(chat(plat, key), 401)["error"]["message"]


def test_model_allow_list_is_403(plat, checks):
    key = new_key(plat, "narrow", models=["Vendor-A/*"])
    body = checks.error_body(chat(plat, key), 403, "permission_error")
    assert MODEL in body["error"]["message"]
    ids = [m.id for m in sdk(plat, key).models.list().data]
    assert MODEL not in ids and UP in ids


def test_cli_creates_a_working_key_and_reports_usage(plat):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")  # rich wraps tables to the terminal width

    def cli(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "lmserve", *args, "--database-url", plat.db_url],
                             capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout

    created = json.loads(cli("keys", "create", "--account", "cli-co", "--tier", "pro", "--rpm", "50", "--balance", "1",
                             "--json"))
    assert created["tier"] == "pro" and created["limits"]["rpm"] == 50
    r = chat(plat, created["key"], max_tokens=2)
    assert r.status_code == 200, r.text
    wait_for_rows(plat, "trace_id = :t", t=r.headers["x-request-id"])
    rows = json.loads(cli("usage", "--account", "cli-co", "--json"))
    assert rows[0]["requests"] == 1 and rows[0]["model"] == MODEL
    assert rows[0]["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    table = cli("usage", "--account", "cli-co", "--since", "1h")
    assert "cli-co" in table and MODEL[:20] in table
    assert "cli-co" in cli("keys", "list", "--account", "cli-co")
    cli("keys", "revoke", str(created["id"]))
    assert chat(plat, created["key"]).status_code == 401
    bad = subprocess.run([sys.executable, "-m", "lmserve", "accounts", "topup", "nobody", "5", "--database-url",
                          plat.db_url], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "no account 'nobody'" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------
# balances, prices, /v1/user/info


def test_balance_is_charged_exactly_and_exhaustion_is_403(plat, checks):
    key = new_key(plat, "payg", balance=None)  # no credit: a priced model is refused
    body = checks.error_body(chat(plat, key), 403, "permission_error")
    assert "balance" in body["error"]["message"]
    admin(plat, "POST", "/accounts/payg/topup", json={"amount": "1"})
    admin(plat, "POST", "/accounts/payg/topup", json={"amount": "0.00005", "granted": True})
    traces = []
    for _ in range(3):
        r = chat(plat, key, max_tokens=4)
        assert r.status_code == 200, r.text
        traces.append(r.headers["x-request-id"])
    rows = wait_for_rows(plat, "trace_id IN (:a, :b, :c)", 3, a=traces[0], b=traces[1], c=traces[2])
    cost = sum(r["cost_nanos"] for r in rows)
    assert all(0 < r["ttft_ms"] <= r["latency_ms"] and r["tier"] == "free" and r["status"] == 200 for r in rows)
    expected = sum(int(r["prompt_tokens"] * PRICE_IN * 1000 + r["completion_tokens"] * PRICE_OUT * 1000)
                   for r in rows)
    assert cost == expected > 0
    info = plat.http.get("/v1/user/info", headers={"Authorization": f"Bearer {key}"})
    assert info.status_code == 200
    doc = info.json()
    assert (doc["code"], doc["message"], doc["status"]) == (20000, "OK", True)
    data = doc["data"]
    assert {"id", "name", "balance", "chargeBalance", "totalBalance", "status"} <= set(data)
    assert data["name"] == "payg" and data["status"] == "normal"
    total_nanos = 10**9 + 50_000 - cost
    assert round(float(data["totalBalance"]) * 10**9) == total_nanos
    assert data["balance"] == "0"  # the granted 0.00005 went first (each request costs more than it)
    assert round(float(data["chargeBalance"]) * 10**9) == total_nanos


def test_user_info_needs_a_key(plat, checks):
    checks.error_body(plat.http.get("/v1/user/info"), 401)
    r = plat.http.get("/v1/user/info", headers={"Authorization": f"Bearer {BOOT_KEY}"})
    assert r.status_code == 200 and r.json()["data"]["name"] == "bootstrap"


def test_user_usage_is_the_keys_usage_per_day_with_its_limits(plat, checks):
    key = new_key(plat, "daily", rpm=77, tpd=123456)
    neighbour = new_key(plat, "daily")  # same account, its own usage
    traces = [chat(plat, key, max_tokens=3).headers["x-request-id"] for _ in range(2)]
    other = chat(plat, neighbour, max_tokens=3).headers["x-request-id"]
    rows = wait_for_rows(plat, "trace_id IN (:a, :b, :c)", 3, a=traces[0], b=traces[1], c=other)
    mine = [r for r in rows if r["trace_id"] in traces]
    r = plat.http.get("/v1/user/usage", params={"days": 7}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["account"] == "daily" and body["days"] == 7 and body["unlimited"] is False
    assert key.startswith(body["key"].rstrip(".")) and key not in r.text
    day = time.strftime("%Y-%m-%d", time.gmtime(mine[0]["created_at"]))
    assert body["data"] == [{"date": day, "model": MODEL, "requests": 2, "errors": 0,
                             "prompt_tokens": sum(x["prompt_tokens"] for x in mine),
                             "completion_tokens": sum(x["completion_tokens"] for x in mine),
                             "cost": body["data"][0]["cost"]}]
    assert round(float(body["data"][0]["cost"]) * 10**9) == sum(x["cost_nanos"] for x in mine) > 0
    limits = body["limits"]["per_model"]
    assert set(limits) >= {MODEL, UP}
    assert limits[MODEL]["rpm"] == 77 and limits[MODEL]["tpd"] == 123456 and limits[MODEL]["tpm"] == 100000
    boot = plat.http.get("/v1/user/usage", headers={"Authorization": f"Bearer {BOOT_KEY}"}).json()
    assert boot["unlimited"] is True and boot["limits"] == {"per_model": {}, "account": {}} and boot["days"] == 30
    for bad in ("0", "367", "abc", "1.5"):
        checks.error_body(plat.http.get("/v1/user/usage", params={"days": bad},
                                        headers={"Authorization": f"Bearer {key}"}), 400, param="days")
    checks.error_body(plat.http.get("/v1/user/usage"), 401)


# ---------------------------------------------------------------------------------------------
# rate limits


def _until_refused(plat, key: str, attempts: int = 12, **body) -> httpx.Response:
    """Requests until one is refused. Each spends far more of the limit than the rate refills
    while it runs, however slow the machine, so a refusal comes within a few."""
    for _ in range(attempts):
        r = chat(plat, key, **body)
        if r.status_code != 200:
            return r
    raise AssertionError(f"no refusal in {attempts} requests")


def test_rpm_429_with_a_retry_after_that_works(plat, checks):
    key = new_key(plat, "rpm-co", rpm=3)  # a burst of 3, then one request per 20 s
    before = checks.metric_total(plat.http, "lmserve_rate_limited_total", limit="RPM")
    r = _until_refused(plat, key)
    body = checks.error_body(r, 429, "rate_limit_error")
    assert "RPM" in body["error"]["message"] and body["code"] == 20029
    wait = int(r.headers["retry-after"])
    assert 1 <= wait <= 20
    assert checks.metric_total(plat.http, "lmserve_rate_limited_total", limit="RPM") == before + 1
    time.sleep(wait)
    assert chat(plat, key).status_code == 200  # waiting Retry-After is enough


def test_rpd_429(plat, checks):
    key = new_key(plat, "rpd-co", rpd=2)
    assert chat(plat, key).status_code == 200 and chat(plat, key).status_code == 200
    r = chat(plat, key)
    assert "RPD" in checks.error_body(r, 429)["error"]["message"]
    assert 43_000 <= int(r.headers["retry-after"]) <= 43_200  # 86400 / 2 s until one more is allowed


def test_token_settlement(plat, count_prompt_tokens):
    """prompt + max_tokens is reserved at admission; what was not generated comes back at the end.
    On TPD, whose refill over a test is nil, so only the settlement can make room."""
    p = count_prompt_tokens([{"role": "user", "content": "Hi"}])
    key = new_key(plat, "settle-co", tpd=2 * p + 150)
    first = chat(plat, key, max_tokens=140, stop=[" ", "e", "a", "o"])
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["completion_tokens"]
    assert used <= 10, f"the stop sequences should end it within a few tokens, got {used}"
    # The refund happens as the request ends, just before its ledger row is written.
    wait_for_rows(plat, "trace_id = :t", t=first.headers["x-request-id"])
    second = chat(plat, key, max_tokens=140, stop=[" ", "e", "a", "o"])
    assert second.status_code == 200, f"without settlement this would be over TPD: {second.text}"


def test_tpm_429(plat, checks, count_prompt_tokens):
    p = count_prompt_tokens([{"role": "user", "content": "Hi"}])
    # Each request (max_tokens 1) takes p + 1 tokens, about 20 s of the rate.
    key = new_key(plat, "tpm-co", tpm=3 * (p + 1))
    r = _until_refused(plat, key)
    assert "TPM" in checks.error_body(r, 429)["error"]["message"]
    wait = int(r.headers["retry-after"])
    assert 1 <= wait <= 21
    time.sleep(wait)
    assert chat(plat, key).status_code == 200
    # A request that can never fit the limit says so (no Retry-After: waiting will not help).
    r = chat(plat, key, max_tokens=400)
    assert "lower max_tokens" in checks.error_body(r, 429)["error"]["message"] and "retry-after" not in r.headers


def test_tpd_429(plat, checks, count_prompt_tokens):
    p = count_prompt_tokens([{"role": "user", "content": "Hi"}])
    key = new_key(plat, "tpd-co", tpd=2 * p + 60)
    first = chat(plat, key, max_tokens=20)
    assert first.status_code == 200
    wait_for_rows(plat, "trace_id = :t", t=first.headers["x-request-id"])  # settled (then recorded)
    r = chat(plat, key, max_tokens=59)
    if first.json()["usage"]["completion_tokens"] <= 1:  # it ended at once: this one fits, the next does not
        assert r.status_code == 200
        r = chat(plat, key, max_tokens=59)
    assert "TPD" in checks.error_body(r, 429)["error"]["message"]
    assert int(r.headers["retry-after"]) > 60  # a day's budget refills over the day


def test_account_wide_limit_spans_its_keys_and_disabling_locks_them_out(plat, checks):
    a, b = new_key(plat, "team"), new_key(plat, "team")
    r = admin(plat, "PATCH", "/accounts/team", json={"rpd": 3})
    assert r.status_code == 200 and r.json()["limits"]["rpd"] == 3
    assert [chat(plat, k).status_code for k in (a, b, a)] == [200, 200, 200]
    body = checks.error_body(chat(plat, b), 429)
    assert "RPD" in body["error"]["message"] and "account" in body["error"]["message"]
    assert admin(plat, "PATCH", "/accounts/team", json={"status": "disabled"}).status_code == 200
    assert "disabled" in checks.error_body(chat(plat, a), 401)["error"]["message"]
    checks.error_body(admin(plat, "PATCH", "/accounts/team", json={"status": "paused"}), 400, param="status")


def test_per_model_token_counters(plat, checks):
    """The counters grow by exactly the tokens a request's usage reports (one request at a time here)."""
    def totals():
        return tuple(checks.metric_total(plat.http, name, model=MODEL)
                     for name in ("lmserve_prompt_tokens_total", "lmserve_generation_tokens_total"))

    before = totals()
    r = chat(plat, new_key(plat, "counted"), "Count to three.", max_tokens=6, ignore_eos=True)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    expected = (before[0] + usage["prompt_tokens"], before[1] + usage["completion_tokens"])
    deadline = time.monotonic() + 60  # the counters are updated after the response is sent
    while totals() != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert totals() == expected and usage["completion_tokens"] == 6
    assert "lmserve_rate_limited_total" in plat.http.get("/metrics").text


# ---------------------------------------------------------------------------------------------
# ledger rows however a request ends


def test_client_disconnect_mid_stream_leaves_a_row_with_its_tokens(plat):
    key = new_key(plat, "leaver")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 300,
            "temperature": 0.7, "stream": True, "stop": []}
    with plat.http.stream("POST", "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {key}"}) as r:
        trace = r.headers["x-request-id"]
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                seen += 1
            if seen >= 5:
                break  # leave with the stream open
    rows = wait_for_rows(plat, "trace_id = :t", t=trace)
    assert len(rows) == 1, "no ledger row for the disconnected request"
    row = rows[0]
    assert row["status"] == 499 and 4 <= row["completion_tokens"] < 300 and row["cost_nanos"] > 0


def test_client_giving_up_on_a_non_streamed_request_leaves_a_row(plat):
    key = new_key(plat, "impatient")
    # ignore_eos and 1500 tokens: minutes of decoding on any CPU, so the 2 s client timeout always
    # comes first (a short answer could finish in time on a fast host).
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write an essay about rivers."}],
            "max_tokens": 1500, "temperature": 0.7, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        plat.http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=2.0)
    rows = wait_for_rows(plat, "key_id = (SELECT id FROM api_keys WHERE name = '' AND account_id = "
                               "(SELECT id FROM accounts WHERE name = 'impatient'))")
    # What it had generated when it left (on a loaded machine that may be nothing yet).
    assert len(rows) == 1 and rows[0]["status"] == 499 and 0 <= rows[0]["completion_tokens"] < 1500


def test_the_default_server_meters_bootstrap_keys_in_sqlite(server, api):
    """The suite's main server has no platform config: its keys are the bootstrap account's, and
    its ledger is the SQLite file in its data directory."""
    r = api.chat({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200
    engine = create_engine(f"sqlite:///{server.log_path.parent / 'lmserve.db'}")
    try:
        deadline = time.monotonic() + 10
        while True:
            with engine.connect() as conn:
                row = conn.execute(text("SELECT u.status, u.completion_tokens, a.name, a.unlimited FROM usage u "
                                        "JOIN accounts a ON a.id = u.account_id WHERE u.trace_id = :t"),
                                   {"t": r.headers["x-request-id"]}).first()
            if row is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        engine.dispose()
    assert row is not None and tuple(row) == (200, r.json()["usage"]["completion_tokens"], "bootstrap", True)


# ---------------------------------------------------------------------------------------------
# Vendor-A upstreams


def test_upstream_stream_equals_the_local_stream_reframed(plat, server):
    key = new_key(plat, "vendor-user")
    msgs = [{"role": "user", "content": "Name three colors."}]
    local = openai.OpenAI(api_key=API_KEY, base_url=server.base_url, max_retries=0)
    want = "".join(c.choices[0].delta.content or "" for c in local.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=24, temperature=0, stream=True) if c.choices)
    chunks = list(sdk(plat, key).chat.completions.create(model=UP, messages=msgs, max_tokens=24, temperature=0,
                                                         stream=True, stream_options={"include_usage": True}))
    got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert got == want and got
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-") and {c.model for c in chunks} == {UP}
    usage = chunks[-1].usage
    assert usage.completion_tokens >= 1 and usage.prompt_tokens > 5  # the upstream's counts, not the estimate
    trace = next(iter({c.id for c in chunks}))[len("chatcmpl-"):]
    row = wait_for_rows(plat, "trace_id = :t", t=trace)[0]
    assert (row["model"], row["status"], row["completion_tokens"]) == (UP, 200, usage.completion_tokens)
    reply = sdk(plat, key).chat.completions.create(model=UP, messages=msgs, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == want and reply.model == UP


def test_upstream_failures_map_to_our_errors(plat, checks):
    key = new_key(plat, "vendor-faults")

    def call(model: str, **extra) -> httpx.Response:
        return chat(plat, key, model=f"Vendor-A/{model}", max_tokens=5, **extra)

    r = call("fault-429")
    assert checks.error_body(r, 429)["error"]["code"] == "upstream_rate_limited" and r.headers["retry-after"] == "7"
    body = checks.error_body(call("fault-500"), 502)
    assert "0xdeadbeef" not in json.dumps(body)  # the upstream's internals stay there
    assert _Faults.calls["fault-500"] == 2  # retried once before giving up
    ok = call("fault-flaky")  # a 500 before the first byte is retried
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello from upstream"
    assert ok.json()["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert "max_tokens is too large" in checks.error_body(call("fault-400"), 400)["error"]["message"]
    # 504 timeout_error is the read timeout (1.5 s) firing: had it not, the upstream's late 500
    # (after 4 s) would have been retried and ended as a 502, as fault-500 does.
    checks.error_body(call("fault-hang"), 504, "timeout_error")
    checks.error_body(call("fault-drop"), 502)
    with plat.http.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "Vendor-A/fault-drop", "messages": [{"role": "user", "content": "Hi"}],
                                "stream": True}) as r:
        events = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "upstream_error"
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Hello"  # what came before the drop
    statuses = sorted(row["status"] for row in wait_for_rows(plat, "model LIKE 'Vendor-A/fault-%%'", 7))
    assert statuses == [200, 400, 429, 502, 502, 502, 504]


# ---------------------------------------------------------------------------------------------
# keep last: stops the platform server


def test_sigterm_drains_in_flight_requests_and_writes_their_rows(plat):
    key = new_key(plat, "at-shutdown")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 30,
            "temperature": 0, "stream": True, "stop": []}
    with plat.http.stream("POST", "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {key}"}) as r:
        trace = r.headers["x-request-id"]
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        plat.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
    assert first and rest[-1] == "data: [DONE]", "the in-flight stream was cut by the shutdown"
    # It finishes within the drain's grace period (200), or, on a machine too loaded for that, is
    # ended by it with an error event (503); either way its row is there with its tokens.
    cut = any('"error"' in line for line in rest)
    plat.proc.wait(timeout=60)
    rows = ledger(plat, "trace_id = :t", t=trace)
    assert len(rows) == 1 and rows[0]["status"] == (503 if cut else 200) and rows[0]["completion_tokens"] >= 1
