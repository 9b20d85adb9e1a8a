#!/usr/bin/env bash
# Private Postgres and Redis for the test suite: loopback only, free ports, data under .build/.
#   scripts/services.sh start   -> starts both, writes .build/services.env (FARM_TEST_* URLs)
#   scripts/services.sh stop    -> stops whatever start started (also after a crash)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)/.build/services"
envfile="$(pwd)/.build/services.env"
pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
as_pg() { if [ "$(id -u)" = 0 ]; then (cd / && su postgres -s /bin/bash -c "$*"); else bash -c "$*"; fi; }  # cd /: the checkout may be private to root
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The postgres user must reach its data dir: a checkout inside a private folder (`mktemp -d` makes
# mode 700) would refuse it, so as root the data dir lives in its own folder under /tmp.
pgdata() { cat "$root/pgdata" 2>/dev/null || echo "$root/pg"; }

stop() {
  local pg; pg="$(pgdata)"
  if [ -f "$pg/postmaster.pid" ]; then as_pg "'$pgbin/pg_ctl' -D '$pg' -m immediate stop" >/dev/null 2>&1 || true; fi
  if [ -f "$root/pgdata" ]; then rm -rf "$pg" "$root/pgdata"; fi
  if [ -f "$root/redis.pid" ]; then kill "$(cat "$root/redis.pid")" 2>/dev/null || true; rm -f "$root/redis.pid"; fi
  rm -f "$envfile"
}

start() {
  stop
  mkdir -p "$root"
  chmod 755 "$(pwd)/.build" "$root"
  pg_port=$(free_port); redis_port=$(free_port)
  local pg
  if [ "$(id -u)" = 0 ]; then
    pg="$(mktemp -d /tmp/farm-pg.XXXXXX)"; chown postgres:postgres "$pg"; echo "$pg" > "$root/pgdata"
  else
    pg="$root/pg"; rm -rf "$pg"; mkdir -p "$pg"
  fi
  as_pg "'$pgbin/initdb' -D '$pg' -U farm --auth=trust -E UTF8 >/dev/null"
  # sockets in the data dir (not /var/run/postgresql, which may not exist); fsync off: test data only
  as_pg "'$pgbin/pg_ctl' -D '$pg' -l '$pg/server.log' -w -t 60 -o \"-h 127.0.0.1 -p $pg_port -k '$pg' -c fsync=off -c full_page_writes=off -c synchronous_commit=off -c max_connections=300\" start" >/dev/null
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$root/redis.pid" --logfile "$root/redis.log" --dir "$root" >/dev/null
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  cat > "$envfile" <<EOT
export FARM_TEST_PG_URL=postgresql+psycopg://farm@127.0.0.1:$pg_port/postgres
export FARM_TEST_PG_PORT=$pg_port
export FARM_TEST_PG_DATA=$pg
export FARM_TEST_PG_BIN=$pgbin
export FARM_TEST_REDIS_URL=redis://127.0.0.1:$redis_port/0
export FARM_TEST_REDIS_PORT=$redis_port
EOT
  echo "services: postgres on 127.0.0.1:$pg_port, redis on 127.0.0.1:$redis_port"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
