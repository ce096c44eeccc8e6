#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), installs the Prometheus server the end-to-end tests start
# and bubblewrap, the python tool's sandbox (Debian packages), checks style, then runs the
# whole test suite, slow end-to-end tests included.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v prometheus >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! command -v bwrap >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# A short private temp dir: vLLM and Ray put sockets there (Unix socket paths are short), and
# everything they leave is removed afterwards.
TMPDIR=$(mktemp -d /tmp/rlfleet-tests.XXXXXX)
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT
.venv/bin/pytest "$@"
