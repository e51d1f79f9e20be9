#!/usr/bin/env bash
# Makes sure PostgreSQL answers on 127.0.0.1:5432 for the tests: starts the local cluster, or
# installs Debian's server first when there is none. The tests create their own databases.
set -euo pipefail
HOST=127.0.0.1
PORT=5432

answers() { pg_isready -q -h "$HOST" -p "$PORT" 2>/dev/null; }

if command -v pg_isready >/dev/null && answers; then
  exit 0
fi
if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  echo "ensure-postgres: installing PostgreSQL from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  # The tests connect over TCP as user postgres without a password, like this machine's
  # set-up: trust loopback connections on this throwaway cluster.
  hba=/etc/postgresql/$version/main/pg_hba.conf
  sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
fi
version=$(ls /etc/postgresql | sort -V | tail -n1)
echo "ensure-postgres: starting cluster $version/main"
pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
for _ in $(seq 1 30); do
  answers && break
  sleep 1
done
answers || { echo "ensure-postgres: PostgreSQL does not answer on $HOST:$PORT" >&2; exit 1; }
psql -h "$HOST" -U postgres -tAc "select 1 from pg_database where datname='test'" | grep -q 1 \
  || psql -h "$HOST" -U postgres -c "create database test" >/dev/null
