#!/usr/bin/env bash
# The demo job: sets up .venv (scripts/setup.sh, idempotent), builds the demo model offline if it
# is missing (a tiny GPT-2 pretrained on the built-in review corpus), then runs examples/demo.yaml:
# PPO with the sentiment reward on a local Ray instance with vLLM generators. Extra arguments go
# to `rlfleet train`, e.g. scripts/demo.sh --set iterations=5
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLFLEET_VENV:-.venv}
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0
MODEL=artifacts/demo-model
[ -f "$MODEL/model.safetensors" ] || "$VENV/bin/rlfleet" tiny-model "$MODEL" --pretrain
exec "$VENV/bin/rlfleet" train --config examples/demo.yaml "$@"
