"""PostgreSQL and Redis for the platform tests: the URLs .ci/run exports, or, when they are not
set (a developer running pytest directly), the same private instances .ci/services.sh starts.
Nothing here skips: without the services, the tests that need them fail and say why."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
_cache: dict[str, str] = {}


def service_urls() -> dict[str, str]:
    if _cache:
        return _cache
    pg, redis = os.environ.get("LMSERVE_TEST_POSTGRES_URL"), os.environ.get("LMSERVE_TEST_REDIS_URL")
    if not (pg and redis):
        run = subprocess.run(["bash", str(_ROOT / ".ci" / "services.sh")], capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            pytest.fail(f"PostgreSQL/Redis for the platform tests could not be started (.ci/services.sh exited "
                        f"{run.returncode}):\n{run.stderr[-3000:]}", pytrace=False)
        exported = dict(line[len("export "):].split("=", 1) for line in run.stdout.splitlines()
                        if line.startswith("export "))
        pg, redis = exported["LMSERVE_TEST_POSTGRES_URL"], exported["LMSERVE_TEST_REDIS_URL"]
    _cache.update(postgres=pg, redis=redis)
    return _cache


def fresh_postgres_url() -> str:
    """The test PostgreSQL database, emptied (tables and Alembic's version) for a new schema."""
    from sqlalchemy import create_engine, text

    url = service_urls()["postgres"]
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS usage, api_keys, accounts, alembic_version CASCADE"))
    except Exception as e:
        pytest.fail(f"the test PostgreSQL at {url} is not usable: {e}", pytrace=False)
    finally:
        engine.dispose()
    return url


def fresh_redis_url() -> str:
    import redis

    url = service_urls()["redis"]
    try:
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
    except Exception as e:
        pytest.fail(f"the test Redis at {url} is not usable: {e}", pytrace=False)
    return url
