"""PostgreSQL and Redis for the platform tests: the URLs .ci/run exports, or, when they are not
set (a developer running pytest directly), the same private instances .ci/services.sh starts.
Nothing here skips: without the services, the tests that need them fail and say why."""

from __future__ import annotations

import atexit
import os
import subprocess
import uuid
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
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
    """A new, empty database on the test PostgreSQL, dropped when the test run ends. Each caller
    gets its own: other checkouts run these tests against the same server at the same time."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = service_urls()["postgres"]
    name = f"lmserve_t{os.getpid()}_{uuid.uuid4().hex[:10]}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:
        pytest.fail(f"the test PostgreSQL at {base} is not usable: {e}", pytrace=False)
    finally:
        engine.dispose()
    _databases.append(name)
    return make_url(base).set(database=name).render_as_string(hide_password=False)


_databases: list[str] = []


@atexit.register
def _drop_databases() -> None:
    if not _databases:
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(service_urls()["postgres"], isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for name in _databases:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    except Exception:
        pass  # the server is gone already; its data dir is a throwaway
    finally:
        engine.dispose()


def redis_url() -> str:
    """The test Redis, checked. Tests keep their counters apart with `unique_prefix()`, never by
    flushing: other checkouts use the same Redis at the same time."""
    import redis

    url = service_urls()["redis"]
    try:
        client = redis.Redis.from_url(url)
        client.ping()
        client.close()
    except Exception as e:
        pytest.fail(f"the test Redis at {url} is not usable: {e}", pytrace=False)
    return url


def unique_prefix() -> str:
    return f"lmserve-test:{os.getpid()}:{uuid.uuid4().hex[:10]}:"
