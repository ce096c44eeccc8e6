#!/usr/bin/env bash
# The multi-turn agent examples: sets up .venv (scripts/setup.sh, idempotent), builds the
# example's tiny model offline if it is missing (a Llama of 2 x 64 pretrained on the task's
# dialogues, a few minutes on 2 cores), then runs it on a local Ray instance with a vLLM
# generator, environment actors and a reward actor:
#   scripts/agent_demo.sh            # examples/agent_calculator.yaml: learn to call a calculator
#   scripts/agent_demo.sh guess      # examples/agent_guess.yaml: guess-the-number in fewer turns
#   scripts/agent_demo.sh openai-guess        # the same game played by an openai-package agent
#   scripts/agent_demo.sh openai-calculator   # the calculator task as an openai-package agent
# Further arguments go to `rlfleet train`, e.g. scripts/agent_demo.sh calculator --set iterations=20
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLE=calculator
case "${1:-}" in
  calculator | guess | openai-calculator | openai-guess) EXAMPLE=$1 && shift ;;
esac
TASK=${EXAMPLE#openai-}
VENV=${RLFLEET_VENV:-.venv}
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0
MODEL=artifacts/$TASK-model
[ -f "$MODEL/model.safetensors" ] || "$VENV/bin/rlfleet" tiny-model "$MODEL" --task "$TASK"
exec "$VENV/bin/rlfleet" train --config "examples/agent_${EXAMPLE//-/_}.yaml" "$@"
