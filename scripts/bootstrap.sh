#!/usr/bin/env bash
# Sets up everything `make test` / `make demo` need on a fresh Debian machine, and nothing twice:
# Debian packages (only when missing), the .venv, torch from the local CPU wheel, the project with
# its dev extras. Safe to run repeatedly; a stamp skips pip when pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
want="${1:-dev}"   # dev: everything the tests need; demo: runtime only

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
[ -x /usr/lib/postgresql/15/bin/initdb ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ "$want" = dev ]; then
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v bwrap >/dev/null || need_apt+=(bubblewrap)
  ls /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 >/dev/null 2>&1 || need_apt+=(libfaketime)
fi
if [ "$want" = demo ]; then need_apt=(); command -v bwrap >/dev/null || need_apt+=(bubblewrap); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: apt-get install ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "bootstrap: missing Debian packages: ${need_apt[*]} (install them as root)" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
hash="$(cat pyproject.toml | sha256sum | cut -c1-16)"
stamp=".venv/.installed-$want-$hash"
# a dev install holds everything a demo needs: `make demo` after `make test` installs nothing (and needs no network)
if [ "$want" = demo ] && [ -f ".venv/.installed-dev-$hash" ]; then stamp=".venv/.installed-dev-$hash"; fi
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  # the local CPU wheel: a plain `torch` requirement would pull a multi-GB CUDA build
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
  if [ "$want" = dev ]; then .venv/bin/pip install -q -e ".[dev]"; else .venv/bin/pip install -q -e .; fi
  touch "$stamp"
fi
