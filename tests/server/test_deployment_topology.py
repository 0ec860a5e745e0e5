"""docs/deployment.md's topology without Docker: two `lmserve serve` processes with the config of
deploy/docker-compose.yml (deploy/lmserve.compose.yaml), on one real PostgreSQL and one real
Redis (the test services; only the URLs differ from the compose file's). What one server does,
the other sees at once: keys, rate limits counted over both, balances and the ledger, exact."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import httpx
import yaml

from tests.support.platform_services import fresh_postgres_url, redis_url, unique_prefix

from .conftest import launch_server, stop_server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ADMIN_KEY = "sk-topology-admin"
RPD = 4  # requests per day: no refill during the test (an RPM would refill one every 15 s)


def _compose_config() -> dict:
    """The servers' config as the compose file mounts it, pointed at the test services."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "lmserve-1", "lmserve-2", "proxy"} <= set(services)
    for name in ("lmserve-1", "lmserve-2"):  # both servers: the same image, command and config file
        assert "./lmserve.compose.yaml:/etc/lmserve/lmserve.yaml:ro" in services[name]["volumes"]
        assert services[name]["command"][:3] == ["serve", "--config", "/etc/lmserve/lmserve.yaml"]
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert "server lmserve-1:8000" in nginx and "server lmserve-2:8000" in nginx and "proxy_buffering off" in nginx
    config = yaml.safe_load((DEPLOY / "lmserve.compose.yaml").read_text())
    assert config["platform"]["database_url"].startswith("postgresql+psycopg://")
    config["platform"].update(database_url=fresh_postgres_url(), redis_url=redis_url(), redis_prefix=unique_prefix())
    for model in config["models"]:  # a smaller cache: two servers on a shared CI machine
        model["engine"] = {"num_kv_blocks": 64, "max_num_seqs": 4}
    return config


def test_two_servers_share_keys_limits_balances_and_the_ledger(tmp_path):
    config = yaml.safe_dump(_compose_config())
    servers = []
    try:
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            servers.append(launch_server(tmp_path / name, config, LMSERVE_ADMIN_KEYS=ADMIN_KEY, LMSERVE_API_KEYS=""))
        one, two = (httpx.Client(base_url=s.url, timeout=120) for s in servers)
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        model = yaml.safe_load((DEPLOY / "lmserve.compose.yaml").read_text())["models"][0]["id"]

        # a key made through server one works on server two at once
        r = one.post("/admin/keys", headers=admin, json={"account": "shared", "balance": "0.25", "rpd": RPD})
        assert r.status_code == 200, r.text
        auth = {"Authorization": f"Bearer {r.json()['key']}"}
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}

        # the limit counts over both servers: exactly RPD requests pass, alternating, then both refuse
        replies = [(one if i % 2 == 0 else two).post("/v1/chat/completions", json=body, headers=auth)
                   for i in range(RPD + 2)]
        assert [r.status_code for r in replies] == [200] * RPD + [429, 429], [r.text for r in replies]
        assert all("rate limit RPD exceeded" in r.json()["error"]["message"] for r in replies[RPD:])

        # the ledger has every served request (whichever server wrote it), and the balance both
        # servers report is the grant less exactly what the ledger charged
        deadline = time.monotonic() + 30
        while True:
            rows = two.get("/admin/usage", headers=admin, params={"account": "shared"}).json()["data"]
            served = sum(row["requests"] - row["errors"] for row in rows)
            if served == RPD or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert served == RPD, rows
        charged = sum(Decimal(row["cost"]) for row in rows)
        assert charged > 0
        balances = [c.get("/v1/user/info", headers=auth).json()["data"]["totalBalance"] for c in (one, two)]
        assert balances[0] == balances[1] and Decimal(balances[0]) == Decimal("0.25") - charged, (balances, charged)

        # a top-up through one, a revocation through two: the other server acts on it at once
        r = one.post("/admin/accounts/shared/topup", headers=admin, json={"amount": "1"})
        assert r.status_code == 200
        assert Decimal(two.get("/v1/user/info", headers=auth).json()["data"]["totalBalance"]) == \
            Decimal("1.25") - charged
        key_id = next(k["id"] for k in two.get("/admin/keys", headers=admin).json()["data"] if k["account"] == "shared")
        assert two.post(f"/admin/keys/{key_id}/revoke", headers=admin).status_code == 200
        r = one.get("/v1/models", headers=auth)
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        one.close()
        two.close()
    finally:
        for srv in servers:
            stop_server(srv)
