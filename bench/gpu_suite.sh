#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py) on a GPU machine, from the repository root:
#   bash bench/gpu_suite.sh [--ranks N] [--json PATH]
# Uses the machine's python3 (PYTHON overrides). Python packages it lacks can come as wheels in
# .whl/ (pydantic and its dependencies on a bare PyTorch image); nothing is downloaded. The
# repository root is the package rlfleet, so it is put on PYTHONPATH under that name.
set -euo pipefail
PYTHON=${PYTHON:-python3}
SITE=$(mktemp -d /tmp/rlfleet-suite.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
if ! "$PYTHON" -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SITE/site" .whl/*.whl
fi
ln -s "$PWD" "$SITE/rlfleet"
export PYTHONPATH="$SITE:$SITE/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" bench/gpu_suite.py "$@"
