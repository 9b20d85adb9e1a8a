#!/usr/bin/env bash
# `make bench`: starts the private Postgres + Redis, runs every benchmark present, stops the services.
# Each bench prints its figures (and writes artifacts/bench_*.json); BENCHMARKS.md records them.
set -uo pipefail
cd "$(dirname "$0")/.."
export LITELLM_LOCAL_MODEL_COST_MAP=True PYTHONUNBUFFERED=1
py=.venv/bin/python
[ -x "$py" ] || py=python3
scripts/services.sh start || { echo "bench: could not start services" >&2; exit 1; }
trap 'scripts/services.sh stop' EXIT INT TERM
# shellcheck disable=SC1091
source .build/services.env
mkdir -p artifacts
status=0
run() { echo; echo "== $*"; "$py" "$@" || status=1; }
run bench/farm.py --workers 1,2 --slots 1,2 --budget 15 --experiments 6
run bench/scheduler_scale.py
for b in bench/policy.py bench/worker_overhead.py bench/api.py bench/lineage.py; do
  [ -f "$b" ] && run "$b"
done
exit "$status"
