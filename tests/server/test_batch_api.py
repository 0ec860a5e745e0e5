"""The batch API through a real server and the official `openai` SDK: files.create ->
batches.create -> batches.retrieve (polled) -> files.content, outputs equal to the same requests
sent interactively (greedy), bad lines in the error file with their line numbers, the ledger's
batch rows at the batch price, another account's 404s, interactive requests admitted ahead of queued lines, and
SIGTERM in the middle of a batch: after a restart every line is in the output once and billed once.

One `lmserve serve` of its own on the test PostgreSQL (the store tests cover SQLite too); the
SIGTERM test restarts it, so keep that one last.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from tests.support.platform_services import fresh_postgres_url

from .conftest import Metrics

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BOOT_KEY = "sk-batch-boot"
ADMIN_KEY = "sk-batch-admin"
SEATS = 16  # the engine's max_num_seqs
PRICE_IN, PRICE_OUT = 2.0, 4.0  # per million tokens; batch lines cost half
ENDPOINT = "/v1/chat/completions"
QUESTIONS = ["What is 2+2?", "Name a color.", "Say hello.", "Count to three.", "What is the capital of France?",
             "Give me a fruit.", "Spell cat.", "What day follows Monday?"]


@pytest.fixture(scope="module")
def plat(servers, tmp_path_factory):
    pg = fresh_postgres_url()
    config = f"""\
server:
  api_keys: ["{BOOT_KEY}"]
platform:
  database_url: "{pg}"
  admin_keys: ["{ADMIN_KEY}"]
  batch_poll_s: 0.2
  batch_lease_s: 10
  batch_concurrency: 64  # more lines than seats: the engine queues the rest
models:
  - id: {MODEL}
    path: {MODEL}
    dtype: float32
    engine: {{num_kv_blocks: 256, max_num_seqs: {SEATS}}}
    price: {{input: {PRICE_IN}, output: {PRICE_OUT}}}
"""
    work = tmp_path_factory.mktemp("lmserve-batch")
    state = {"srv": servers.launch(work, config), "work": work, "config": config, "db": create_engine(pg)}
    yield state
    servers.stop(state["srv"])
    state["db"].dispose()


def new_key(plat, account: str) -> str:
    r = httpx.post(f"{plat['srv'].url}/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                   json={"account": account, "balance": "10"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["key"]


def sdk(plat, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=plat["srv"].base_url, max_retries=0, timeout=60.0)


def body(i: int) -> dict:
    """Mixed parameters, greedy so the interactive answer is the reference."""
    b = {"model": MODEL, "temperature": 0, "max_tokens": 3 + i % 6,
         "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
    if i % 3 == 1:
        b["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
    if i % 4 == 2:
        b["stop"] = ["."]
    if i % 5 == 3:
        b["frequency_penalty"] = 0.5
    if i % 7 == 4:
        b["seed"] = i
    return b


def jsonl(items) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in items).encode()


def request_line(cid: str, b: dict) -> dict:
    return {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": b}


def wait_done(client: openai.OpenAI, batch_id: str, timeout_s: float = 240.0):
    deadline = time.monotonic() + timeout_s
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        assert time.monotonic() < deadline, f"batch still {b.status} after {timeout_s} s: {b.request_counts}"
        time.sleep(0.3)


def test_sdk_batch_equals_interactive_and_reports_bad_lines(plat):
    alice = sdk(plat, new_key(plat, "batch-alice"))
    n = 24
    items = [request_line(f"req-{i}", body(i)) for i in range(n)]
    items.insert(5, {"custom_id": "req-3", "method": "POST", "url": ENDPOINT, "body": body(3)})  # duplicate id
    items.insert(9, {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": body(0)})
    raw = jsonl(items).replace(b'"custom_id": "req-7"', b'"custom_id": "req-7", oops', 1)  # line 9: not JSON
    f = alice.files.create(file=("batch.jsonl", raw), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(raw) and alice.files.retrieve(f.id).filename == "batch.jsonl"
    batch = alice.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h",
                                 metadata={"job": "nightly"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "nightly"}
    done = wait_done(alice, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == n + 2 and done.request_counts.failed == 3
    assert done.request_counts.completed == n - 1
    out = [json.loads(x) for x in alice.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(x) for x in alice.files.content(done.error_file_id).text.splitlines()]
    assert sorted(e["error"]["line"] for e in errors) == [6, 9, 10]
    assert {e["error"]["code"] for e in errors} == {"duplicate_custom_id", "invalid_json_line", "invalid_url"}
    by_id = {o["custom_id"]: o for o in out}
    assert len(by_id) == len(out) == n - 1 and "req-7" not in by_id
    ran = [i for i in range(n) if i != 7]
    with ThreadPoolExecutor(8) as pool:  # the references together: the engine batches them too
        refs = dict(zip(ran, pool.map(lambda i: alice.chat.completions.create(**body(i)), ran), strict=True))
    for i in ran:
        o = by_id[f"req-{i}"]
        assert o["error"] is None and o["response"]["status_code"] == 200 and o["id"].startswith("batch_req_")
        got = o["response"]["body"]
        ref = refs[i]
        assert got["choices"][0]["message"]["content"] == ref.choices[0].message.content, i
        assert got["choices"][0]["finish_reason"] == ref.choices[0].finish_reason, i
        assert got["usage"]["completion_tokens"] == ref.usage.completion_tokens, i
    # the ledger: one row per line that ran, marked with the batch, at half the price
    with plat["db"].connect() as c:
        rows = c.execute(text("SELECT prompt_tokens, completion_tokens, cost_nanos, status FROM usage "
                              "WHERE batch_id = :b"), {"b": batch.id}).all()
    assert len(rows) == n - 1 and all(r.status == 200 for r in rows)
    for p, comp, cost, _ in rows:
        assert cost == int((PRICE_IN / 2 * p + PRICE_OUT / 2 * comp) * 1000)
    assert batch.id in [b.id for b in alice.batches.list(limit=5).data]


def test_another_account_gets_404(plat):
    alice = sdk(plat, new_key(plat, "batch-owner"))
    bob = sdk(plat, new_key(plat, "batch-stranger"))
    f = alice.files.create(file=("b.jsonl", jsonl([request_line("x", body(0))])), purpose="batch")
    batch = alice.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")
    for call in (lambda: bob.batches.retrieve(batch.id), lambda: bob.batches.cancel(batch.id),
                 lambda: bob.files.retrieve(f.id), lambda: bob.files.content(f.id), lambda: bob.files.delete(f.id),
                 lambda: bob.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert bob.batches.list().data == [] and bob.files.list().data == []
    assert wait_done(alice, batch.id).status == "completed"
    with pytest.raises(openai.BadRequestError):
        alice.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        alice.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h",
                             metadata={f"k{i}": "v" for i in range(17)})
    assert alice.files.delete(f.id).deleted


def _completed(client: openai.OpenAI, batch_id: str) -> int:
    return client.batches.retrieve(batch_id).request_counts.completed


def test_interactive_request_goes_ahead_of_queued_batch_lines(plat):
    """Priority as behaviour, not as a time: with the engine full of batch lines and more of them
    queued, an interactive request is admitted ahead of every queued line (preempting one for a
    seat), so it streams its first token while fewer lines complete than were queued before it.
    First come, first served would have run every queued line first. (How much the batch slows an
    interactive request down is a speed question: benchmarks/bench_batch.py.)"""
    client = sdk(plat, BOOT_KEY)
    http = httpx.Client(base_url=plat["srv"].url, headers={"Authorization": f"Bearer {BOOT_KEY}"}, timeout=60)
    lines = [request_line(f"t{i}", {**body(i), "max_tokens": 24, "temperature": 0}) for i in range(60)]
    f = client.files.create(file=("t.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")
    deadline = time.monotonic() + 120
    # every seat a batch line's and at least as many queued, read in one scrape (between two steps
    # a finished line has left its seat before the next one takes it)
    while True:
        scrape = Metrics(http.get("/metrics").text)
        running = scrape.value("lmserve_num_requests_running", model=MODEL)
        queued = scrape.value("lmserve_num_requests_waiting", model=MODEL)
        if running == SEATS and queued >= SEATS:
            break
        assert time.monotonic() < deadline, f"the batch never filled the engine ({running} running, {queued} queued)"
        assert client.batches.retrieve(batch.id).status in ("validating", "in_progress")
        time.sleep(0.1)
    before = _completed(client, batch.id)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                            max_tokens=2, temperature=0, stream=True)
    ran_meanwhile = None
    for chunk in stream:
        if ran_meanwhile is None and chunk.choices and chunk.choices[0].delta.content:
            ran_meanwhile = _completed(client, batch.id) - before
    assert ran_meanwhile is not None, "the interactive request streamed no content"
    assert ran_meanwhile < queued, (ran_meanwhile, queued)
    assert client.batches.retrieve(batch.id).status == "in_progress"
    client.batches.cancel(batch.id)
    assert wait_done(client, batch.id).status == "cancelled"
    http.close()


def test_sigterm_mid_batch_then_restart_runs_every_line_once(plat, servers):
    client = sdk(plat, BOOT_KEY)
    n = 200  # the size; two tokens a line keep it short
    f = client.files.create(file=("s.jsonl", jsonl(request_line(f"s{i}", {**body(i), "max_tokens": 2})
                                                   for i in range(n))), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 10:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.close()
    servers.stop(plat["srv"])  # SIGTERM, waits for the exit
    with plat["db"].connect() as c:
        done_before = c.execute(text("SELECT count(*) FROM batch_lines WHERE batch_id = :b AND state = 'done'"),
                                {"b": batch.id}).scalar()
    assert 10 <= done_before < n, done_before
    plat["srv"] = servers.launch(plat["work"], plat["config"])
    client = sdk(plat, BOOT_KEY)
    done = wait_done(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == n
    ids = [json.loads(x)["custom_id"] for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(ids) == sorted(f"s{i}" for i in range(n))  # each exactly once
    with plat["db"].connect() as c:
        rows = c.execute(text("SELECT trace_id FROM usage WHERE batch_id = :b"), {"b": batch.id}).scalars().all()
    assert len(rows) == n and len(set(rows)) == n
