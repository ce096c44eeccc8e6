#!/usr/bin/env bash
# The verifiable-reward example: sets up .venv (scripts/setup.sh, idempotent), builds the
# arithmetic model offline if it is missing (a tiny GPT-2 pretrained on noisy worked sums, about
# a minute on 2 cores), then runs examples/grpo_arithmetic.yaml: GRPO with the exact-answer reward
# on a local Ray instance with a vLLM generator. Extra arguments go to `rlfleet train`,
# e.g. scripts/grpo_demo.sh --set iterations=50
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLFLEET_VENV:-.venv}
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0
MODEL=artifacts/arithmetic-model
[ -f "$MODEL/model.safetensors" ] || "$VENV/bin/rlfleet" tiny-model "$MODEL" --task arithmetic
exec "$VENV/bin/rlfleet" train --config examples/grpo_arithmetic.yaml "$@"
