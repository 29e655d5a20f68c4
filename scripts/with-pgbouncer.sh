#!/usr/bin/env bash
# Runs a command with a PgBouncer in transaction mode in front of the server
# on 127.0.0.1:5432, and CAIRN_TEST_POOLER naming it: the test helpers then
# build every App of the `postgres` user on that server through the pooler
# (with the direct URL for the listener and migrations, as
# App::builder().transaction_pooler() wants). Far fewer server connections
# than cairn opens client connections, so sessions really are shared; idle
# ones close after a second, so the per-test databases do not pile up
# connections on the server.
#
#   ./scripts/with-pgbouncer.sh cargo test --test workflow
set -euo pipefail

bin=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ -x "$bin" ] || { echo "with-pgbouncer: install pgbouncer (scripts/ensure-postgres.sh does)" >&2; exit 1; }

dir=$(mktemp -d /tmp/cairn-pgbouncer.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf '"postgres" ""\n' > "$dir/users.txt"
cat > "$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=5432

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = transaction
default_pool_size = 4
max_user_connections = 40
server_idle_timeout = 1
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits
INI
chmod -R a+rX "$dir"
as=()
# PgBouncer refuses to run as root.
[ "$(id -u)" = 0 ] && as=(-u postgres)
"$bin" "${as[@]}" "$dir/pgbouncer.ini" 2> "$dir/pgbouncer.log" &
pid=$!
cleanup() {
    local rc=$?
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
    exit "$rc"
}
trap cleanup EXIT
up=no
for _ in $(seq 1 100); do
    if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then up=yes; break; fi
    sleep 0.1
done
if [ "$up" != yes ]; then
    echo "with-pgbouncer: pgbouncer did not listen on $port:" >&2
    cat "$dir/pgbouncer.log" >&2
    exit 1
fi
export CAIRN_TEST_POOLER="postgres://postgres@127.0.0.1:$port"
echo "with-pgbouncer: $CAIRN_TEST_POOLER (transaction mode, 4 server connections per database, 40 in all)" >&2
"$@"
