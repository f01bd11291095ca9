#!/usr/bin/env bash
# The agent CLIs the e2e tests drive through the gateway: Claude Code (`claude`) and the Codex
# CLI (`codex`), npm packages pinned below, installed under $ENGINEGATE_HOME/agent-clis (never
# globally). Idempotent; prints CLAUDE=... and CODEX=... (the executables). Needs npm, which
# deploy/test.sh installs (Debian's nodejs and npm) when missing; without it, prints nothing and
# exits 3, and tests/e2e/test_agent_clis.py skips saying so.
#   ENGINEGATE_HOME  where it lives (default: ${XDG_CACHE_HOME:-~/.cache}/enginegate)
set -euo pipefail
home=${ENGINEGATE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/enginegate}
dir=$home/agent-clis
# The versions the e2e tests were written against; bump them together with the tests.
packages=(@anthropic-ai/claude-code@2.1.332 @openai/codex@0.171.0)

if ! command -v npm >/dev/null; then
  echo "setup: npm not found: install Node.js and npm (bash deploy/test.sh does) to run the agent CLI tests" >&2
  exit 3
fi
stamp=$dir/.installed-$(echo "${packages[*]}" | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: installing ${packages[*]} into $dir" >&2
  mkdir -p "$dir"
  npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "${packages[@]}" >&2
  rm -f "$dir"/.installed-*
  touch "$stamp"
fi
echo "CLAUDE=$dir/node_modules/.bin/claude"
echo "CODEX=$dir/node_modules/.bin/codex"
