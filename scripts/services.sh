#!/usr/bin/env bash
# Private Postgres and Redis for the test suite: loopback only, free ports, data under .build/.
#   scripts/services.sh start   -> starts both, writes .build/services.env (FARM_TEST_* URLs)
#   scripts/services.sh stop    -> stops whatever start started (also after a crash)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)/.build/services"
envfile="$(pwd)/.build/services.env"
pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

stop() {
  if [ -f "$root/pg/postmaster.pid" ]; then as_pg "'$pgbin/pg_ctl' -D '$root/pg' -m immediate stop" >/dev/null 2>&1 || true; fi
  if [ -f "$root/redis.pid" ]; then kill "$(cat "$root/redis.pid")" 2>/dev/null || true; rm -f "$root/redis.pid"; fi
  rm -f "$envfile"
}

start() {
  stop
  mkdir -p "$root"
  chmod 755 "$(pwd)/.build" "$root"
  pg_port=$(free_port); redis_port=$(free_port)
  if [ ! -f "$root/pg/PG_VERSION" ]; then
    rm -rf "$root/pg"; mkdir -p "$root/pg"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$root/pg"
    as_pg "'$pgbin/initdb' -D '$root/pg' -U farm --auth=trust -E UTF8 >/dev/null"
  fi
  # sockets in the data dir (not /var/run/postgresql, which may not exist); fsync off: test data only
  as_pg "'$pgbin/pg_ctl' -D '$root/pg' -l '$root/pg/server.log' -w -t 60 -o \"-h 127.0.0.1 -p $pg_port -k '$root/pg' -c fsync=off -c full_page_writes=off -c synchronous_commit=off -c max_connections=300\" start" >/dev/null
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$root/redis.pid" --logfile "$root/redis.log" --dir "$root" >/dev/null
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  cat > "$envfile" <<EOT
export FARM_TEST_PG_URL=postgresql+psycopg://farm@127.0.0.1:$pg_port/postgres
export FARM_TEST_PG_PORT=$pg_port
export FARM_TEST_PG_DATA=$root/pg
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
