#!/usr/bin/env bash
# A throwaway PostgreSQL 15 for the tests (sourced by tests/run.sh): installs Debian's
# postgresql-15 if its binaries are missing, creates a cluster in a temporary directory as an
# unprivileged user (PostgreSQL refuses to run as root), starts it on a free port of 127.0.0.1,
# and exports CUBBY_TEST_POSTGRES_URL for the tests. `postgres_stop` stops it and removes it.
# It also exports CUBBY_TEST_PG_BIN, where initdb and pg_ctl are, for the tests that run a
# PostgreSQL of their own to stop and start (server/tests/cluster.rs). `haproxy_install` installs
# Debian's HAProxy for that test.
#
# By hand:  source tests/postgres.sh && postgres_start && cargo test -p cubby-store-postgres

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"

postgres_install() {
    [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] && return
    echo "== installing postgresql-15 from Debian's packages" >&2
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        postgresql-15 >/dev/null
}

haproxy_install() {
    command -v haproxy >/dev/null && return
    echo "== installing haproxy from Debian's packages" >&2
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        haproxy >/dev/null
}

postgres_start() {
    postgres_install
    export CUBBY_TEST_PG_BIN="$PG_BIN"
    local as=()
    if [ "$(id -u)" -eq 0 ]; then
        # The package made the `postgres` user; the server runs as it.
        as=(runuser -u postgres --)
    fi
    PG_TEST_DIR="$(mktemp -d /tmp/cubby-pg.XXXXXX)"
    chmod 0755 "$PG_TEST_DIR"
    [ ${#as[@]} -eq 0 ] || chown postgres: "$PG_TEST_DIR"
    local port
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "${as[@]}" "$PG_BIN/initdb" --pgdata="$PG_TEST_DIR/data" --username=cubby --auth=trust \
        --encoding=UTF8 --no-instructions >"$PG_TEST_DIR/initdb.log" 2>&1 \
        || { cat "$PG_TEST_DIR/initdb.log" >&2; return 1; }
    # TLS as a production database offers it, with a certificate for 127.0.0.1 and localhost
    # signed by a CA of the tests' own (CUBBY_TEST_POSTGRES_CA); plain connections stay allowed.
    local tls="$PG_TEST_DIR/tls"
    mkdir -p "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=cubby test CA" -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
        -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$tls/san.ext"
    openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
        -CAcreateserial -days 2 -extfile "$tls/san.ext" -out "$tls/server.pem" 2>/dev/null
    chmod 0600 "$tls/server.key"
    [ ${#as[@]} -eq 0 ] || chown -R postgres: "$tls"
    # Real durability (fsync, synchronous commit) as in production; the tests check it.
    "${as[@]}" "$PG_BIN/pg_ctl" --pgdata="$PG_TEST_DIR/data" --log="$PG_TEST_DIR/server.log" \
        --wait --timeout=60 \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -k $PG_TEST_DIR -c max_connections=200 \
            -c ssl=on -c ssl_cert_file=$tls/server.pem -c ssl_key_file=$tls/server.key" \
        start >/dev/null || { cat "$PG_TEST_DIR/server.log" >&2; return 1; }
    export CUBBY_TEST_POSTGRES_CA="$tls/ca.pem"
    PG_TEST_AS=("${as[@]}")
    export CUBBY_TEST_POSTGRES_URL="postgresql://cubby@127.0.0.1:$port/postgres"
    echo "== PostgreSQL 15 for the tests at $CUBBY_TEST_POSTGRES_URL ($PG_TEST_DIR)" >&2
}

postgres_stop() {
    [ -n "${PG_TEST_DIR:-}" ] || return 0
    "${PG_TEST_AS[@]}" "$PG_BIN/pg_ctl" --pgdata="$PG_TEST_DIR/data" --mode=fast --wait stop \
        >/dev/null 2>&1 || true
    rm -rf "$PG_TEST_DIR"
    unset PG_TEST_DIR CUBBY_TEST_POSTGRES_URL CUBBY_TEST_POSTGRES_CA
}
