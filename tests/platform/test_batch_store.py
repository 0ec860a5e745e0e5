"""The batch API's store on SQLite and PostgreSQL: files owned by an account, line validation with
line numbers, claiming (no line taken twice, also by two workers at once), leases that run out,
results recorded only by the holder, finalizing into output and error files, cancel and expiry."""

from __future__ import annotations

import json
import threading

from sqlalchemy import update

from lmserve.platform import batches as store
from lmserve.platform import keys
from lmserve.platform.files import FileStore

ENDPOINT = "/v1/chat/completions"
MODEL = "m"


def _line(cid, content="hi", **over) -> str:
    item = {"custom_id": cid, "method": "POST", "url": ENDPOINT,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}}
    item.update(over)
    return json.dumps(item)


def _usable(model):
    return None if model == MODEL else f"model {model!r} does not exist"


def _accounts(db):
    a = keys.get_or_create_account(db, "alice")
    b = keys.get_or_create_account(db, "bob")
    return a.id, b.id


def _create(db, account_id, text: str, **kw) -> dict:
    lines, errors = store.check_lines(text.encode(), ENDPOINT, kw.pop("model", None), _usable)
    return store.create(db, account_id=account_id, key_id=1, endpoint=ENDPOINT, input_file_id="file-x",
                        window="24h", model=None, metadata=kw.pop("metadata", None), lines=lines, errors=errors)


def test_files_belong_to_their_account(db, tmp_path):
    alice, bob = _accounts(db)
    files = FileStore(db, tmp_path / "files")
    size = files.write("file-a1", iter([b'{"x": 1}\n', b'{"x": 2}\n']))
    files.add("file-a1", alice, "batch", "in.jsonl", size, 2)
    assert files.get("file-a1", alice).bytes == size == 18
    assert files.get("file-a1", bob) is None
    assert [f.id for f in files.list(alice)] == ["file-a1"] and files.list(bob) == []
    assert not files.delete("file-a1", bob) and files.path("file-a1").exists()
    assert files.delete("file-a1", alice) and not files.path("file-a1").exists()
    assert files.get("file-a1", alice) is None


def test_invalid_lines_are_reported_with_their_numbers(db):
    alice, _ = _accounts(db)
    text = "\n".join([
        _line("a"),
        "not json",
        _line("a"),  # duplicate custom_id
        _line("c", method="GET"),
        _line("d", url="/v1/embeddings"),
        json.dumps({"custom_id": "e", "method": "POST", "url": ENDPOINT,
                    "body": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}),
        json.dumps({"custom_id": "f", "method": "POST", "url": ENDPOINT,
                    "body": {"model": MODEL, "messages": [], "max_tokens": 4}}),
        "",
        _line("h"),
    ])
    b = _create(db, alice, text)
    assert b["status"] == "in_progress"
    assert b["request_counts"] == {"total": 8, "completed": 0, "failed": 6}
    errs = [json.loads(r) for r in store._results(db, b["id"], ("failed",))]
    assert [e["error"]["line"] for e in errs] == [2, 3, 4, 5, 6, 7]
    assert [e["error"]["code"] for e in errs][:5] == ["invalid_json_line", "duplicate_custom_id", "invalid_method",
                                                      "invalid_url", "model_not_found"]
    assert all(e["error"]["message"].startswith(f"line {e['error']['line']}:") for e in errs)
    assert errs[-1]["error"]["param"] == "body.messages"


def test_a_file_without_usable_lines_fails_the_batch(db):
    alice, _ = _accounts(db)
    b = _create(db, alice, "nope\n" + _line("x", method="GET"))
    assert b["status"] == "failed" and b["failed_at"]
    assert [e["line"] for e in b["errors"]["data"]] == [1, 2]
    assert _create(db, alice, "\n\n")["errors"]["data"][0]["code"] == "empty_file"


def test_claims_are_exclusive_and_leases_expire(db):
    alice, bob = _accounts(db)
    b = _create(db, alice, "\n".join(_line(f"r{i}") for i in range(40)))
    assert store.get(db, b["id"], bob) is None and store.list_batches(db, bob, None, 10) == ([], False)
    got: dict[str, list] = {}

    def take(name):
        mine = []
        while batch := store.claim(db, name, 3, 60.0):
            mine += batch
        got[name] = mine

    threads = [threading.Thread(target=take, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [line.id for lines in got.values() for line in lines]
    assert len(ids) == 40 and len(set(ids)) == 40  # every line once, over three racing workers
    assert store.claim(db, "late", 5, 60.0) == []
    # w0 dies: its lines come back once their lease ran out, and only the new holder records them
    dead = got["w0"]
    if dead:
        with db.session() as s:
            s.execute(update(store.BatchLine).where(store.BatchLine.id.in_([x.id for x in dead]))
                      .values(claimed_until=0.0))
        again = store.claim(db, "w9", 100, 60.0)
        assert sorted(x.id for x in again) == sorted(x.id for x in dead)
        assert not store.complete(db, "w0", dead[0].id, True, "{}")
        assert store.complete(db, "w9", dead[0].id, True, "{}")


def test_finalize_writes_output_and_error_files_in_line_order(db, tmp_path):
    alice, _ = _accounts(db)
    files = FileStore(db, tmp_path / "files")
    b = _create(db, alice, "\n".join([_line("a"), "broken", _line("c"), _line("d")]), metadata={"k": "v"})
    claimed = store.claim(db, "w", 10, 60.0)
    assert [c.custom_id for c in claimed] == ["a", "c", "d"] and claimed[0].body["model"] == MODEL
    assert store.due(db, 60.0) == []
    for c in reversed(claimed):
        ok = c.custom_id != "d"
        store.complete(db, "w", c.id, ok, store.output_line(c.custom_id, 200 if ok else 400, "req", {}, None))
    assert store.due(db, 60.0) == [b["id"]]
    assert store.finalize(db, files, b["id"], 60.0)
    assert not store.finalize(db, files, b["id"], 60.0)  # one finalizer
    done = store.get(db, b["id"], alice)
    assert done["status"] == "completed" and done["completed_at"] and done["metadata"] == {"k": "v"}
    assert done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    out = [json.loads(x) for x in files.read(done["output_file_id"]).decode().splitlines()]
    err = [json.loads(x) for x in files.read(done["error_file_id"]).decode().splitlines()]
    assert [x["custom_id"] for x in out] == ["a", "c"]
    assert [x["custom_id"] for x in err] == [None, "d"] and err[0]["error"]["line"] == 2
    assert files.get(done["output_file_id"], alice).purpose == "batch_output"


def test_cancel_and_expiry_keep_what_finished(db, tmp_path):
    alice, bob = _accounts(db)
    files = FileStore(db, tmp_path / "files")
    b = _create(db, alice, "\n".join(_line(f"r{i}") for i in range(4)))
    first = store.claim(db, "w", 1, 60.0)[0]
    assert store.cancel(db, b["id"], bob) is None
    assert store.cancel(db, b["id"], alice)["status"] == "cancelling"
    assert store.claim(db, "w", 10, 60.0) == []  # nothing new starts
    assert store.due(db, 60.0) == []  # the running line finishes first
    store.complete(db, "w", first.id, True, store.output_line("r0", 200, "q", {}, None))
    assert store.due(db, 60.0) == [b["id"]] and store.finalize(db, files, b["id"], 60.0)
    c = store.get(db, b["id"], alice)
    assert c["status"] == "cancelled" and c["request_counts"]["completed"] == 1 and c["error_file_id"] is None

    e = _create(db, alice, "\n".join(_line(f"r{i}") for i in range(3)))
    line = store.claim(db, "w", 1, 60.0)[0]
    store.complete(db, "w", line.id, True, store.output_line("r0", 200, "q", {}, None))
    with db.session() as s:
        s.execute(update(store.Batch).where(store.Batch.id == e["id"]).values(expires_at=1.0))
    assert store.claim(db, "w", 10, 60.0) == []
    assert store.due(db, 60.0) == [e["id"]] and store.finalize(db, files, e["id"], 60.0)
    x = store.get(db, e["id"], alice)
    assert x["status"] == "expired" and x["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    err = [json.loads(v) for v in files.read(x["error_file_id"]).decode().splitlines()]
    assert [v["error"]["code"] for v in err] == ["batch_expired", "batch_expired"]


def test_cli_lists_shows_and_cancels(db, capsys):
    from lmserve.cli import main

    alice, bob = _accounts(db)
    b = _create(db, alice, "\n".join(_line(f"r{i}") for i in range(3)))
    other = _create(db, bob, _line("x"))

    def cli(*args):
        capsys.readouterr()
        rc = main([*args, "--database-url", db.url])
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, _ = cli("batches", "list", "--json")
    assert rc == 0 and {x["id"] for x in json.loads(out)} == {b["id"], other["id"]}
    rc, out, _ = cli("batches", "list", "--account", "alice", "--json")
    assert [x["id"] for x in json.loads(out)] == [b["id"]]
    rc, out, _ = cli("batches", "list")
    assert rc == 0 and b["id"] in out and "0/3" in out
    rc, out, _ = cli("batches", "cancel", b["id"], "--json")
    assert rc == 0 and json.loads(out)["status"] == "cancelling"
    rc, out, _ = cli("batches", "show", b["id"], "--json")
    assert json.loads(out)["cancelling_at"] is not None
    rc, _, err = cli("batches", "show", "batch_nope")
    assert rc == 2 and "no batch batch_nope" in err
