"""Fixtures for the platform's direct tests: a fresh database on each engine (SQLite file and
PostgreSQL, every test runs on both), and the real Redis."""

from __future__ import annotations

import pytest

from lmserve.platform.db import Database
from tests.support.platform_services import fresh_postgres_url, redis_url, unique_prefix


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> Database:
    url = f"sqlite:///{tmp_path / 'lmserve.db'}" if request.param == "sqlite" else fresh_postgres_url()
    database = Database(url)
    database.migrate()
    yield database
    database.close()


@pytest.fixture
def redis_limiter_args() -> dict:
    """RedisLimiter keyword arguments: the test Redis, counters under a prefix of this test's own."""
    return {"url": redis_url(), "prefix": unique_prefix()}
