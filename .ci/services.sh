#!/usr/bin/env bash
# PostgreSQL and Redis for the platform tests. Prints `export ...` lines for the caller to eval:
#     env=$(bash .ci/services.sh) && eval "$env"
#
# Installs them from Debian's packages when missing, starts a private instance of each (own data
# directory, own ports, so a developer's machine and other checkouts are left alone) unless one
# already answers there, and prints LMSERVE_TEST_POSTGRES_URL and LMSERVE_TEST_REDIS_URL.
# Any failure stops here with the reason: the platform tests need both and never skip.
set -euo pipefail

_svc_fail() { echo "=================================================================" >&2
              echo "lmserve CI: $*" >&2
              echo "=================================================================" >&2; exit 1; }

SVC_DIR=${LMSERVE_SERVICES_DIR:-/tmp/lmserve-test-services}
PG_PORT=${LMSERVE_TEST_PG_PORT:-55432}
REDIS_PORT=${LMSERVE_TEST_REDIS_PORT:-56379}
mkdir -p "$SVC_DIR"

_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
. "$(dirname "$0")/apt.sh"
if [ -z "$(_pg_bin)" ] || ! command -v redis-server >/dev/null; then
    lmserve_apt_install "the platform tests' PostgreSQL and Redis" postgresql redis-server
fi
PG_BIN=$(_pg_bin)
[ -n "$PG_BIN" ] || _svc_fail "PostgreSQL binaries not found after install"

# PostgreSQL refuses to run as root: run it as the `postgres` user (the package creates it).
if [ "$(id -u)" = 0 ] && ! id -u postgres >/dev/null 2>&1; then
    useradd --system --no-create-home postgres || _svc_fail "could not create the postgres user"
fi
_as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
PG_DATA="$SVC_DIR/pg"
if ! "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
        rm -rf "$PG_DATA"; mkdir -p "$PG_DATA"
        [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DATA"
        _as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust >"$SVC_DIR/initdb.log" 2>&1 \
            || _svc_fail "initdb failed: $(tail -5 "$SVC_DIR/initdb.log")"
    fi
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$SVC_DIR" 2>/dev/null || true
    _as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$SVC_DIR/pg.log" -w -t 60 \
        -o "-p $PG_PORT -k $PG_DATA -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start \
        >/dev/null || _svc_fail "PostgreSQL did not start: $(tail -5 "$SVC_DIR/pg.log")"
fi
"$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || _svc_fail "PostgreSQL is not answering on port $PG_PORT"
if ! "$PG_BIN/../bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='lmserve_test'" | grep -q 1; then
    "$PG_BIN/../bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE lmserve_test" \
        || _svc_fail "could not create the lmserve_test database"
fi

if ! redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no \
        --dir "$SVC_DIR" --logfile "$SVC_DIR/redis.log" --pidfile "$SVC_DIR/redis.pid" \
        || _svc_fail "redis-server did not start"
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
fi
redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG \
    || _svc_fail "Redis is not answering on port $REDIS_PORT: $(tail -5 "$SVC_DIR/redis.log" 2>/dev/null)"

echo "export LMSERVE_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/lmserve_test"
echo "export LMSERVE_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
echo "lmserve CI: PostgreSQL on 127.0.0.1:$PG_PORT, Redis on 127.0.0.1:$REDIS_PORT" >&2
