#!/usr/bin/env bash
# Create the gateway's own venv (.venv in the repo, ignored by git) with the dev extras.
# Idempotent: reinstalls only when pyproject.toml changed.
set -euo pipefail
# pip warns once per package about local index folders this machine lacks; keep the rest.
pip_quiet() { "$@" 2> >(grep -v '^WARNING: Location' >&2); }
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: installing enginegate and its dev tools into .venv" >&2
  pip_quiet .venv/bin/pip install -q --upgrade pip
  pip_quiet .venv/bin/pip install -q -e ".[dev]"
  .venv/bin/python -c "import gateway, backends, openai, pytest" # fail here, not in the tests
  rm -f .venv/.installed-*
  touch "$stamp"
fi
