#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 with trust auth for
# local connections, as cairn's tests and examples expect. On a Debian machine
# (root) it installs PostgreSQL and PgBouncer if missing and starts the
# cluster if stopped. Does nothing more when a server already answers.
set -euo pipefail

host=127.0.0.1
port=5432

# The pooler tests start Debian's PgBouncer themselves: install it if missing.
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    echo "ensure-postgres: installing pgbouncer" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi

if pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
    exit 0
fi

fresh=no
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "ensure-postgres: installing PostgreSQL" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fresh=yes
fi

version=$(ls /etc/postgresql | sort -V | tail -n 1)
if [ -z "$version" ]; then
    pg_createcluster "$(ls /usr/lib/postgresql | sort -V | tail -n 1)" main
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    fresh=yes
fi
if [ "$fresh" = yes ]; then
    # A throwaway development server: trust local connections.
    hba=/etc/postgresql/$version/main/pg_hba.conf
    sed -i '1i local all all trust\nhost all all 127.0.0.1/32 trust' "$hba"
fi

echo "ensure-postgres: starting cluster $version/main" >&2
pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
for _ in $(seq 1 30); do
    if pg_isready -q -h "$host" -p "$port"; then
        exit 0
    fi
    sleep 1
done
echo "ensure-postgres: PostgreSQL did not come up on $host:$port" >&2
exit 1
