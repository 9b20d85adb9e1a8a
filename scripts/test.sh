#!/usr/bin/env bash
# `make test`: lint, type-check and the whole pytest suite against private Postgres and Redis.
# Services are stopped on every exit path; the exit code is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export LITELLM_LOCAL_MODEL_COST_MAP=True PYTHONUNBUFFERED=1
scripts/services.sh start || { echo "test: could not start services" >&2; exit 1; }
trap 'scripts/services.sh stop' EXIT INT TERM
# shellcheck disable=SC1091
source .build/services.env
mkdir -p artifacts
status=0
echo "== ruff"; .venv/bin/ruff check . || status=1
echo "== mypy"; .venv/bin/mypy || status=1
echo "== pytest"
if [ $# -gt 0 ]; then
  .venv/bin/python -m pytest -q -rfEs --durations=15 "$@" || status=$?
else
  .venv/bin/python -m pytest -q -rfEs --durations=15 --ignore=tests/gpu || status=$?
  # compiled (not interpreted) Triton kernels need a process of their own; skipped without CUDA
  echo "== pytest tests/gpu"
  # (exit 5 = the module skipped itself: no CUDA here)
  FARM_TEST_CUDA=1 .venv/bin/python -m pytest -q -rfEs tests/gpu || { s=$?; [ "$s" = 5 ] || status=$s; }
fi
if [ "$status" = 5 ]; then echo "test: pytest collected no tests" >&2; status=1; fi
exit "$status"
