"""The web playground and console in a real Chromium (Debian's `chromium`, driven by Selenium
through the matching `chromium-driver`), against a real `lmserve serve` with the platform layer
(an admin key, a metered key on a priced model): what a user sees is what the API answered.

One server and one browser for the module. Without Chromium or its driver every test here fails
and says what to install (`make test` installs both: .ci/browser.sh); nothing skips. Screenshots
go to $LMSERVE_TEST_ARTIFACTS (default tests/artifacts/, not committed)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

BOOT_KEY = "sk-web-boot"
ADMIN_KEY = "sk-web-admin"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRICED = "Pro/SmolLM2-web"  # priced: the console's cost chart has something to show
ARTIFACTS = Path(os.environ.get("LMSERVE_TEST_ARTIFACTS") or Path(__file__).resolve().parent.parent / "artifacts")
WAIT_S = 90.0  # a generous bound for one short reply on a loaded 2-core CI machine

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
    engine: {{num_kv_blocks: 128, max_num_seqs: 8}}
  - id: {PRICED}
    path: {MODEL}
    dtype: float32
    price: {{input: 2.0, output: 4.0}}
    engine: {{num_kv_blocks: 128, max_num_seqs: 8}}
"""


def _find(env: str, names: tuple[str, ...]) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="module")
def web(servers, tmp_path_factory):
    srv = servers.launch(tmp_path_factory.mktemp("lmserve-web"), CONFIG)
    srv.http = httpx.Client(base_url=srv.url, timeout=60.0)
    r = srv.http.post("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      json={"account": "web", "name": "browser", "balance": "5", "rpm": 600, "tpm": 100000})
    assert r.status_code == 200, r.text
    srv.key = r.json()["key"]
    yield srv
    srv.http.close()
    servers.stop(srv)


@pytest.fixture(scope="module")
def browser():
    chromium = _find("LMSERVE_CHROMIUM", ("chromium", "chromium-browser", "google-chrome"))
    driver_path = _find("LMSERVE_CHROMEDRIVER", ("chromedriver",))
    if not chromium or not driver_path:
        pytest.fail("the web UI tests need Chromium and its driver: apt-get install chromium chromium-driver "
                    "(`make test` installs them as root: .ci/browser.sh), or set LMSERVE_CHROMIUM / "
                    "LMSERVE_CHROMEDRIVER", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the web UI tests need selenium (pip install -e '.[test]')", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-prefers-reduced-motion"):
        options.add_argument(arg)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def _server_frees_everything(web):
    """The module's own invariant for the server process: after each test no request is left
    running or waiting and every KV block is free (a stopped stream included)."""
    yield
    deadline = time.monotonic() + 15
    while True:
        busy = _engine_gauges(web)
        if not any(busy.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not any(busy.values()), f"the server still holds requests or KV blocks: {busy}"


def _engine_gauges(web) -> dict[str, float]:
    text = web.http.get("/metrics").text
    out = {}
    for line in text.splitlines():
        for name in ("lmserve_num_requests_running", "lmserve_num_requests_waiting", "lmserve_kv_cache_usage_ratio"):
            if line.startswith(name + "{"):
                out[line.split(" ")[0]] = float(line.rsplit(" ", 1)[1])
    return out


# ---------------------------------------------------------------------------------------------
# page helpers


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def wait_for(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))
    except Exception as e:
        logs = "\n".join(str(x) for x in driver.get_log("browser"))
        raise AssertionError(f"timed out waiting for {what}; browser log:\n{logs}") from e


def fill(driver, element_id: str, value: str) -> None:
    el = by_id(driver, element_id)
    el.clear()
    if value:
        el.send_keys(value)


def enter_key(driver, key: str) -> None:
    from selenium.webdriver.common.keys import Keys

    fill(driver, "api-key", key)
    by_id(driver, "api-key").send_keys(Keys.ENTER)


def open_page(driver, web, page: str, key: str) -> None:
    """Load a page in a fresh tab state and enter the key the way a user does."""
    driver.get(web.url + page)
    driver.execute_script("sessionStorage.clear()")
    driver.get(web.url + page)
    enter_key(driver, key)


def open_playground(driver, web, key: str | None = None) -> None:
    open_page(driver, web, "/playground", key or web.key)
    wait_for(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-models") == "2",
             "the model list")


def watch_output(driver) -> None:
    """Record, for each reply panel, the length of its text at every DOM change (and when), so
    a test sees whether the text arrived in steps."""
    driver.execute_script("""
        window.__steps = {};
        new MutationObserver(() => {
          for (const p of document.querySelectorAll('.reply')) {
            const s = (window.__steps[p.id] ||= []);
            const n = p.textContent.length;
            if (!s.length || s[s.length - 1][0] !== n) s.push([n, performance.now()]);
          }
        }).observe(document.getElementById('outputs'), {childList: true, subtree: true, characterData: true});
    """)


def send_and_wait(driver, columns=("a",), status="done") -> None:
    by_id(driver, "send").click()
    for c in columns:
        wait_for(driver, lambda d, c=c: d.find_element("id", f"column-{c}").get_attribute("data-status") != "streaming",
                 f"reply {c} to end")
        got = by_id(driver, f"column-{c}").get_attribute("data-status")
        assert got == status, f"column {c}: {got}: {by_id(driver, f'error-{c}').text}"


def assert_no_script_errors(driver) -> None:
    """No JavaScript error and no content-security-policy violation in the page's console (the
    API's own 4xx answers show there as network errors; those are expected)."""
    bad = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]
    assert not bad, bad


def screenshot(driver, name: str) -> Path:
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def code_tab(driver, lang: str) -> str:
    by_id(driver, f"code-tab-{lang}").click()
    return by_id(driver, "code").text


# ---------------------------------------------------------------------------------------------
# the chat page


def test_start_banner_prints_the_playground_url(web):
    assert f"playground: {web.url}/playground" in web.output()


def test_chat_streams_and_ends_with_the_apis_greedy_answer(web, browser):
    d = browser
    open_playground(d, web)
    assert by_id(d, "p-temperature").get_attribute("placeholder") == "0.7"  # the deployment's default, shown
    fill(d, "p-temperature", "0")
    fill(d, "p-max_tokens", "24")
    fill(d, "composer-input", "What is the capital of France?")
    by_id(d, "view-code").click()
    request = json.loads(code_tab(d, "json"))  # exactly what Send posts
    assert request == {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                       "temperature": 0, "max_tokens": 24, "stream": True, "stream_options": {"include_usage": True}}
    codes = {lang: code_tab(d, lang) for lang in ("curl", "python", "js")}
    for lang, code in codes.items():
        assert web.key not in code and web.key[:6] + "..." in code, lang  # masked
    assert "$LMSERVE_API_KEY" in codes["curl"] and f"{web.url}/v1/chat/completions" in codes["curl"]
    assert 'os.environ["LMSERVE_API_KEY"]' in codes["python"] and "temperature=0" in codes["python"]
    assert "process.env.LMSERVE_API_KEY" in codes["js"]

    watch_output(d)
    send_and_wait(d)
    shown = by_id(d, "out-a-0").get_attribute("textContent")
    steps = d.execute_script("return window.__steps['out-a-0']")
    assert len(steps) >= 3 and steps[-1][0] == len(shown), steps  # it grew in steps, not at once
    assert int(by_id(d, "out-a-0").get_attribute("data-updates")) >= 2
    stats = by_id(d, "stats-a").text
    assert "TTFT" in stats and "tok/s" in stats and "tokens" in stats, stats

    body = {k: v for k, v in request.items() if k not in ("stream", "stream_options")}
    r = web.http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {web.key}"})
    assert r.status_code == 200, r.text
    assert shown == r.json()["choices"][0]["message"]["content"] and shown
    transcript = by_id(d, "transcript").text
    assert "What is the capital of France?" in transcript
    code_tab(d, "python")
    screenshot(d, "playground.png")
    assert_no_script_errors(d)


def test_stop_mid_stream_frees_the_request(web, browser, checks):
    d = browser
    open_playground(d, web)
    fill(d, "p-max_tokens", "1500")
    fill(d, "p-extra", '{"ignore_eos": true}')
    fill(d, "composer-input", "Count from one to one thousand in words.")
    before = checks.metric_total(web.http, "lmserve_requests_total", status="499")
    send_start = time.monotonic()
    by_id(d, "send").click()
    wait_for(d, lambda d: int(d.find_element("id", "out-a-0").get_attribute("data-updates")) >= 3, "a few tokens")
    by_id(d, "stop").click()
    wait_for(d, lambda d: d.find_element("id", "column-a").get_attribute("data-status") != "streaming", "the stop")
    assert by_id(d, "column-a").get_attribute("data-status") == "stopped"
    assert "stopped" in by_id(d, "stats-a").text
    assert by_id(d, "out-a-0").get_attribute("textContent")
    assert by_id(d, "send").is_enabled() and not by_id(d, "stop").is_enabled()
    # the server saw the client leave: the request counts as 499 and its blocks are freed
    wait_for(d, lambda _: checks.metric_total(web.http, "lmserve_requests_total", status="499") == before + 1,
             "the 499 in /metrics", timeout=20)
    assert time.monotonic() - send_start < WAIT_S  # it did not run its 1500 tokens


def test_json_modes_and_tools(web, browser):
    d = browser
    open_playground(d, web)
    fill(d, "p-temperature", "0")
    fill(d, "p-max_tokens", "64")
    from selenium.webdriver.support.ui import Select

    Select(by_id(d, "p-format")).select_by_value("json_object")
    fill(d, "composer-input", "Describe a cat as a JSON object with its name and age.")
    send_and_wait(d)
    assert "finish: eos" in by_id(d, "stats-a").text or "finish: stop" in by_id(d, "stats-a").text
    value = json.loads(by_id(d, "out-a-0").get_attribute("textContent"))
    assert isinstance(value, dict) and value

    # the schema editor starts with an example (name, age); the reply follows it
    by_id(d, "clear").click()
    Select(by_id(d, "p-format")).select_by_value("json_schema")
    schema = json.loads(by_id(d, "p-schema").get_attribute("value"))
    assert schema["required"] == ["name", "age"]
    fill(d, "composer-input", "Describe a cat as a JSON object with its name and age.")
    send_and_wait(d)
    value = json.loads(by_id(d, "out-a-0").get_attribute("textContent"))
    assert set(value) == {"name", "age"} and isinstance(value["age"], int), value

    # tools: the example, a forced call, shown as the call
    by_id(d, "clear").click()
    Select(by_id(d, "p-format")).select_by_value("text")
    by_id(d, "tools-example").click()
    assert json.loads(by_id(d, "p-tools").get_attribute("value"))[0]["function"]["name"] == "get_weather"
    Select(by_id(d, "p-tool_choice")).select_by_value("required")
    fill(d, "composer-input", "What is the weather in Paris?")
    send_and_wait(d)
    call = by_id(d, "out-a-0").find_element("css selector", "pre.tool-calls").text
    assert call.startswith("tool call get_weather(") and "finish: tool_calls" in by_id(d, "stats-a").text, call
    json.loads(call[len("tool call get_weather("):-1])  # the arguments are JSON
    assert_no_script_errors(d)


def test_side_by_side_streams_two_columns_at_once_with_choices_as_tabs(web, browser):
    d = browser
    open_playground(d, web)
    from selenium.webdriver.support.ui import Select

    by_id(d, "compare").click()
    Select(by_id(d, "model-b")).select_by_value(PRICED)
    fill(d, "overrides-b", '{"temperature": 0}')
    fill(d, "p-max_tokens", "16")
    fill(d, "p-n", "2")
    fill(d, "p-extra", '{"ignore_eos": true}')
    by_id(d, "p-logprobs").click()
    fill(d, "p-top_logprobs", "3")
    fill(d, "composer-input", "Write a haiku about the sea.")
    watch_output(d)
    send_and_wait(d, columns=("a", "b"))
    steps = d.execute_script("return window.__steps")
    for c in ("a", "b"):
        for i in (0, 1):
            assert by_id(d, f"out-{c}-{i}").get_attribute("textContent"), (c, i)
        stats = by_id(d, f"stats-{c}").text
        assert "TTFT" in stats and "tok/s" in stats and "32 tokens" in stats, stats  # n=2 x 16
    tokens = by_id(d, "out-b-0").find_elements("css selector", "span.tok")
    assert tokens, "logprobs asked for: the tokens are coloured by probability"
    p = float(tokens[0].get_attribute("data-p"))
    assert 0 < p <= 1 and "logprob" in tokens[0].get_attribute("title") and "top:" in tokens[0].get_attribute("title")
    screenshot(d, "playground-side-by-side.png")
    a, b = steps["out-a-0"], steps["out-b-0"]
    assert a[0][1] < b[-1][1] and b[0][1] < a[-1][1], (a, b)  # the two streams overlapped in time
    assert not by_id(d, "out-a-1").is_displayed()
    by_id(d, "tab-a-1").click()  # the second choice, in its tab
    assert by_id(d, "out-a-1").is_displayed() and not by_id(d, "out-a-0").is_displayed()


def test_api_errors_are_shown_as_the_apis_message(web, browser):
    d = browser
    bad = "sk-not-a-real-key"
    open_page(d, web, "/playground", bad)
    expected = web.http.get("/v1/models", headers={"Authorization": f"Bearer {bad}"}).json()["error"]["message"]
    wait_for(d, lambda d: d.find_element("id", "banner").is_displayed(), "the 401 message")
    assert by_id(d, "banner").text == f"401: {expected}"

    open_playground(d, web)
    fill(d, "p-top_p", "5")
    fill(d, "composer-input", "Hi")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "top_p": 5, "stream": True}
    expected = web.http.post("/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {web.key}"}).json()["error"]["message"]
    send_and_wait(d, status="error")
    assert by_id(d, "error-a").text == f"400: {expected}"
    assert by_id(d, "composer-input").get_attribute("value") == "Hi"  # kept for a corrected resend

    limited = web.http.post("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                            json={"account": "web-limited", "balance": "1", "rpm": 1}).json()["key"]
    open_playground(d, web, limited)
    fill(d, "p-max_tokens", "1")
    fill(d, "composer-input", "Hi")
    send_and_wait(d)
    fill(d, "composer-input", "Hi again")
    send_and_wait(d, status="error")
    shown = by_id(d, "error-a").text
    assert shown.startswith("429: ") and "RPM" in shown.upper(), shown


def test_keyboard_phone_width_and_dark_mode(web, browser):
    d = browser
    from selenium.webdriver.common.keys import Keys

    d.set_window_size(390, 844)
    d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        open_playground(d, web)
        fill(d, "p-max_tokens", "6")
        box = by_id(d, "composer-input")
        box.send_keys("Hello!")
        box.send_keys(Keys.CONTROL, Keys.ENTER)  # sends from the keyboard
        wait_for(d, lambda d: d.find_element("id", "column-a").get_attribute("data-status") == "done", "the reply")
        assert by_id(d, "out-a-0").get_attribute("textContent")
        overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"the page is {overflow}px wider than a phone screen"
        bg = d.execute_script("return getComputedStyle(document.body).backgroundColor")
        rgb = [int(x) for x in bg[bg.index("(") + 1:bg.index(")")].split(",")[:3]]
        assert sum(rgb) < 200, f"dark mode asked for, background is {bg}"
        unlabelled = d.execute_script("""
            return [...document.querySelectorAll('input, select, textarea')]
              .filter(e => !e.labels || !e.labels.length).map(e => e.id);""")
        assert unlabelled == [], unlabelled
        screenshot(d, "playground-phone-dark.png")
        open_page(d, web, "/console", web.key)
        wait_for(d, lambda d: d.find_element("tag name", "body").get_attribute("data-platform"), "the console")
        overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"the console is {overflow}px wider than a phone screen"
    finally:
        d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        d.set_window_size(1280, 1000)


# ---------------------------------------------------------------------------------------------
# the console


def test_console_charts_engine_metrics_usage_and_admin_tables(web, browser):
    d = browser
    d.set_window_size(1280, 1700)
    try:
        open_page(d, web, "/console?interval=1", web.key)
        wait_for(d, lambda d: int(d.find_element("tag name", "body").get_attribute("data-scrapes") or 0) >= 1,
                 "the first scrape")
        from selenium.webdriver.support.ui import Select

        Select(by_id(d, "deployment")).select_by_value(PRICED)  # the deployment the traffic goes to

        def traffic():  # a stream while the console watches: tokens/s above zero, a cost today
            body = {"model": PRICED, "messages": [{"role": "user", "content": "Tell me a story."}],
                    "max_tokens": 48, "ignore_eos": True, "stream": True}
            with web.http.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {web.key}"}) as r:
                r.read()

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            for chart in ("chart-requests", "chart-throughput", "chart-ttft", "chart-itl"):
                wait_for(d, lambda d, c=chart: float(d.find_element("id", c).get_attribute("data-max") or 0) > 0,
                         f"{chart} above zero")
        finally:
            thread.join(timeout=WAIT_S)
        assert "ms" in by_id(d, "stat-ttft").text and "ms" in by_id(d, "stat-itl").text
        assert by_id(d, "chart-requests").find_elements("css selector", "path.line")

        # the key: usage per day, balance, limits (once the ledger has the request's row)
        deadline = time.monotonic() + 15
        while not web.http.get("/v1/user/usage", headers={"Authorization": f"Bearer {web.key}"}).json()["data"]:
            assert time.monotonic() < deadline, "no usage row for the console's request"
            time.sleep(0.2)
        by_id(d, "refresh-usage").click()
        wait_for(d, lambda d: float(d.find_element("id", "chart-usage-cost").get_attribute("data-max") or 0) > 0,
                 "the usage charts")
        assert float(by_id(d, "chart-usage-tokens").get_attribute("data-max")) > 0
        assert by_id(d, "chart-usage-tokens").get_attribute("data-points") == "14"
        info = web.http.get("/v1/user/info", headers={"Authorization": f"Bearer {web.key}"}).json()["data"]
        assert info["totalBalance"] in by_id(d, "stat-balance").text and float(info["totalBalance"]) < 5
        rows = [r.text for r in by_id(d, "limits-table").find_elements("css selector", "tbody tr")]
        assert any(r.startswith(MODEL) and "600" in r for r in rows), rows
        assert "admin key" in by_id(d, "admin-note").text
        screenshot(d, "console.png")

        enter_key(d, ADMIN_KEY)
        wait_for(d, lambda d: d.find_element("id", "accounts-table").is_displayed(), "the accounts table")
        accounts = by_id(d, "accounts-table").text
        assert "web" in accounts and "bootstrap" in accounts
        assert web.key[:6] in by_id(d, "keys-table").text and web.key not in d.page_source
        assert_no_script_errors(d)
    finally:
        d.set_window_size(1280, 1000)


# ---------------------------------------------------------------------------------------------
# the console's admin actions and the playground's tool results (issue 25)


def _admin(web, method: str, path: str, **kwargs):
    r = web.http.request(method, path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def _account(web, name: str) -> dict:
    return next(a for a in _admin(web, "GET", "/admin/accounts")["data"] if a["name"] == name)


def test_console_admin_creates_revokes_tops_up_and_edits(web, browser):
    """What an admin does from the console lands in the platform exactly as the admin API says,
    and the new key, shown once, is a working key with the limits the form gave it."""
    from selenium.webdriver.support.ui import Select

    d = browser
    open_page(d, web, "/console", ADMIN_KEY)
    wait_for(d, lambda d: d.find_element("id", "admin-actions").is_displayed(), "the admin actions")

    # create: a key for a new account, its own RPM, one model, granted credit
    fill(d, "ck-account", "team-ui")
    fill(d, "ck-name", "made in the console")
    fill(d, "ck-balance", "1.5")
    fill(d, "ck-rpm", "42")
    fill(d, "ck-models", "Pro/*")
    by_id(d, "ck-submit").click()
    wait_for(d, lambda d: d.find_element("id", "new-key").is_displayed(), "the new key")
    key = by_id(d, "new-key-value").text
    assert key.startswith("sk-") and len(key) > 40
    row = next(k for k in _admin(web, "GET", "/admin/keys")["data"] if k["account"] == "team-ui")
    assert (row["name"], row["limits"]["rpm"], row["models"]) == ("made in the console", 42, ["Pro/*"])
    r = web.http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [PRICED], r.text
    wait_for(d, lambda d: row["prefix"] in d.find_element("id", "keys-table").text, "the key in the table")
    assert key not in by_id(d, "keys-table").text  # the table shows its prefix only
    by_id(d, "new-key-done").click()
    assert key not in d.page_source  # shown once: gone from the page when done

    # top up (paid), then edit the tier and the account-wide limits
    wait_for(d, lambda d: "team-ui" in [o.text for o in Select(d.find_element("id", "ac-account")).options],
             "the account in the form")
    Select(by_id(d, "ac-account")).select_by_value("team-ui")
    fill(d, "ac-amount", "2")
    by_id(d, "ac-topup").click()
    wait_for(d, lambda d: "total" in d.find_element("id", "ac-note").text, "the top-up")
    account = _account(web, "team-ui")
    assert (account["balance"], account["charge_balance"]) == ("1.5", "2"), account
    assert f"total {account['total_balance']}" in by_id(d, "ac-note").text
    wait_for(d, lambda d: d.find_element("id", "ac-tier").get_attribute("value") == "free", "the account's values")
    fill(d, "ac-tier", "pro")
    fill(d, "ac-tpm", "5000")
    Select(by_id(d, "ac-status")).select_by_value("active")
    by_id(d, "ac-save").click()
    wait_for(d, lambda d: "tier pro" in d.find_element("id", "ac-note").text, "the saved account")
    account = _account(web, "team-ui")
    assert account["tier"] == "pro" and account["limits"] == {"rpm": None, "rpd": None, "tpm": 5000, "tpd": None}
    # cleared in the form, cleared in the account
    fill(d, "ac-tpm", "")
    by_id(d, "ac-save").click()
    wait_for(d, lambda d: "limits -" in d.find_element("id", "ac-note").text, "the limits removed")
    assert _account(web, "team-ui")["limits"]["tpm"] is None

    # revoke: the first click asks, the second revokes; the key is refused from then on
    by_id(d, f"revoke-{row['id']}").click()
    assert by_id(d, f"revoke-{row['id']}").text == "Confirm revoke"
    assert web.http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    by_id(d, f"revoke-{row['id']}").click()
    wait_for(d, lambda d: "Revoked key" in d.find_element("id", "keys-note").text, "the revocation")
    r = web.http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert row["prefix"] not in by_id(d, "keys-table").text  # active keys only, by default
    by_id(d, "show-revoked").click()
    wait_for(d, lambda d: row["prefix"] in d.find_element("id", "keys-table").text, "the revoked key listed")
    listed = [r.text for r in by_id(d, "keys-table").find_elements("css selector", "tbody tr")]
    assert any(row["prefix"] in r and "revoked" in r for r in listed), listed

    # a refused action shows the API's message
    fill(d, "ck-account", "team-ui")
    fill(d, "ck-expires", "someday")
    by_id(d, "ck-submit").click()
    wait_for(d, lambda d: d.find_element("id", "ck-note").text.startswith("400:"), "the API's 400")
    assert "someday" in by_id(d, "ck-note").text
    screenshot(d, "console-admin.png")
    assert_no_script_errors(d)


def test_playground_sends_tool_results_and_the_model_continues(web, browser):
    """A reply that calls a tool offers a field for each call's result; sending them continues
    the conversation with `tool` messages, and the reply is the API's own greedy answer to the
    same messages."""
    from selenium.webdriver.support.ui import Select

    d = browser
    open_playground(d, web)
    fill(d, "p-temperature", "0")
    fill(d, "p-max_tokens", "64")
    by_id(d, "tools-example").click()
    Select(by_id(d, "p-tool_choice")).select_by_value("required")
    fill(d, "composer-input", "What is the weather in Paris?")
    assert not by_id(d, "tool-results").is_displayed()
    send_and_wait(d)
    wait_for(d, lambda d: d.find_element("id", "tool-results").is_displayed(), "the tool results form")
    by_id(d, "view-code").click()
    sent = json.loads(code_tab(d, "json"))  # the conversation so far, as the next request carries it
    user, assistant = sent["messages"]
    call = assistant["tool_calls"][0]
    assert user["role"] == "user" and call["function"]["name"] == "get_weather" and call["id"]
    label = d.find_element("css selector", "label[for=tool-result-0]").text
    assert label == f"Result of get_weather({call['function']['arguments']})"

    by_id(d, "send-tool-results").click()  # empty: asks for it, sends nothing
    assert "Enter the result of get_weather" in by_id(d, "banner").text
    result = '{"temperature": 21, "unit": "C", "sky": "sunny"}'
    fill(d, "tool-result-0", result)
    Select(by_id(d, "p-tool_choice")).select_by_value("none")
    fill(d, "p-max_tokens", "24")
    by_id(d, "send-tool-results").click()
    wait_for(d, lambda d: d.find_element("id", "column-a").get_attribute("data-status") != "streaming",
             "the reply after the tool result")
    assert by_id(d, "column-a").get_attribute("data-status") == "done", by_id(d, "error-a").text
    shown = by_id(d, "out-a-0").get_attribute("textContent")
    assert not by_id(d, "tool-results").is_displayed()
    transcript = by_id(d, "transcript").text
    assert "tool call get_weather(" in transcript and result in transcript

    body = {"model": MODEL, "messages": [user, assistant, {"role": "tool", "tool_call_id": call["id"],
                                                         "content": result}],
            "temperature": 0, "max_tokens": 24, "tools": sent["tools"], "tool_choice": "none"}
    r = web.http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {web.key}"})
    assert r.status_code == 200, r.text
    assert shown == r.json()["choices"][0]["message"]["content"] and shown
    assert_no_script_errors(d)


def test_long_model_ids_fit_the_dropdown(web, browser):
    """A select narrower than a model id shows it abbreviated in the middle, its start and its
    distinguishing end kept and the whole label inside the box; the value stays the full id."""
    d = browser
    open_playground(d, web)
    measure = """
        const s = document.getElementById('model-a');
        s.style.width = arguments[0];
        s.style.maxWidth = arguments[0] ? 'none' : '';
        window.dispatchEvent(new Event('resize'));
        const st = getComputedStyle(s);
        const ctx = document.createElement('canvas').getContext('2d');
        ctx.font = `${st.fontWeight} ${st.fontSize} ${st.fontFamily}`;
        const label = s.options[s.selectedIndex].text;
        return [label, s.value, ctx.measureText(label).width,
                s.clientWidth - parseFloat(st.paddingLeft) - parseFloat(st.paddingRight)];
    """
    for width, end in (("", "/SmolLM2-135M-Instruct"), ("150px", "M-Instruct")):  # the page's width, a narrow one
        label, value, text_px, box_px = d.execute_script(measure, width)
        assert value == MODEL and label != MODEL and "…" in label, label
        assert label[0] == MODEL[0] and label.endswith(end) and text_px <= box_px, (label, text_px, box_px)
        assert by_id(d, "model-a").get_attribute("title") == MODEL
    assert d.execute_script(measure, "40rem")[0] == MODEL  # room enough: whole
    d.execute_script(measure, "")
    assert_no_script_errors(d)
