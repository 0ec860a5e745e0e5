"""`lmserve accounts topup|set|list`, run in-process on a SQLite database, each effect read back
from the accounts table with plain SQL (not through the code under test)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, text

from lmserve.cli import main


@pytest.fixture
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'lmserve.db'}"


def _cli(capsys, db_url: str, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([*args, "--database-url", db_url])
    except SystemExit as e:  # argparse refused an argument (its usage, then one error line)
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _row(db_url: str, name: str) -> dict:
    engine = create_engine(db_url)
    try:
        with engine.connect() as c:
            return dict(c.execute(text("SELECT * FROM accounts WHERE name = :n"), {"n": name}).mappings().one())
    finally:
        engine.dispose()


def test_accounts_topup_set_and_list(capsys, db_url):
    rc, _, err = _cli(capsys, db_url, "keys", "create", "--account", "acme", "--json")
    assert rc == 0, err
    start = _row(db_url, "acme")
    assert (start["balance_nanos"], start["charge_balance_nanos"]) == (0, 0)

    rc, out, err = _cli(capsys, db_url, "accounts", "topup", "acme", "10.50")
    assert rc == 0, err
    assert "chargeBalance 10.5" in out and "total 10.5" in out, out
    rc, out, err = _cli(capsys, db_url, "accounts", "topup", "acme", "2", "--granted")
    assert rc == 0, err
    row = _row(db_url, "acme")
    assert (row["balance_nanos"], row["charge_balance_nanos"]) == (2 * 10**9, 10_500_000_000)

    rc, out, err = _cli(capsys, db_url, "accounts", "set", "acme", "--tier", "pro", "--rpm", "5", "--tpd", "900",
                        "--status", "disabled")
    assert rc == 0, err
    assert "tier pro" in out and "status disabled" in out and "rpm=5" in out and "tpd=900" in out, out
    row = _row(db_url, "acme")
    assert (row["tier"], row["status"], row["rpm"], row["tpd"], row["tpm"]) == ("pro", "disabled", 5, 900, None)
    rc, _, err = _cli(capsys, db_url, "accounts", "set", "acme", "--clear-limits", "--tpm", "70", "--status", "active")
    assert rc == 0, err
    row = _row(db_url, "acme")
    assert (row["status"], row["rpm"], row["tpd"], row["tpm"]) == ("active", None, None, 70)

    rc, out, err = _cli(capsys, db_url, "accounts", "list", "--json")
    assert rc == 0, err
    listed = {a["name"]: a for a in json.loads(out)}
    acme = listed["acme"]
    assert (acme["tier"], acme["status"], acme["limits"]["tpm"]) == ("pro", "active", 70)
    assert [float(acme[k]) for k in ("balance", "charge_balance", "total_balance")] == [2, 10.5, 12.5]
    rc, out, _ = _cli(capsys, db_url, "accounts", "list")
    assert rc == 0 and "acme" in out and "pro" in out


@pytest.mark.parametrize("args,message", [
    (("accounts", "topup", "nobody", "5"), "no account 'nobody'"),
    (("accounts", "topup", "acme", "-3"), "must be positive"),
    (("accounts", "topup", "acme", "0"), "must be positive"),
    (("accounts", "set", "acme", "--rpm", "0"), "argument --rpm: must be at least 1, got 0"),
    (("accounts", "set", "nobody", "--tier", "pro"), "no account 'nobody'"),
], ids=["topup-unknown", "topup-negative", "topup-zero", "set-zero-limit", "set-unknown"])
def test_accounts_errors_are_one_line_and_change_nothing(capsys, db_url, args, message):
    assert _cli(capsys, db_url, "keys", "create", "--account", "acme", "--json")[0] == 0
    before = _row(db_url, "acme")
    rc, _, err = _cli(capsys, db_url, *args)
    assert rc == 2 and message in err and "Traceback" not in err, err
    # one line of error (argparse's usage lines before it aside)
    assert len([line for line in err.strip().splitlines() if not line.startswith(("usage:", " "))]) == 1
    assert _row(db_url, "acme") == before
