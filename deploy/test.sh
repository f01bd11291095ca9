#!/usr/bin/env bash
# Everything the tests need, then the tests: lint, unit, scripted-upstream integration, and the
# e2e suite against real vLLM CPU engines (the first run installs the engine: a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
bash deploy/setup-cpu-engine.sh >/dev/null
bash deploy/setup-engine-parsers.sh >/dev/null  # SGLang's and LMDeploy's argv parsers
# Prometheus (with promtool) and Chromium for the observability e2e tests, PostgreSQL for the
# store, npm for the agent CLIs (Claude Code, Codex): Debian packages, installed only when missing.
missing=()
{ command -v prometheus && command -v promtool; } >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
{ command -v pg_ctl || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl"; } >/dev/null \
  || missing+=(postgresql)
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  echo "test: installing ${missing[*]} (apt-get)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
bash deploy/setup-agent-clis.sh >/dev/null  # claude and codex, pinned, under ENGINEGATE_HOME
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # gateway/ and backends/, as [tool.mypy] in pyproject.toml says
exec .venv/bin/pytest "$@"
