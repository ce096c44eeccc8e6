#!/usr/bin/env bash
# Creates .venv-trl: TRL v0.11.4 with transformers 4.45.2, the reference implementation that
# tests/trainers/trl_reference/make_reference.py and `bench/ppo_step.py --impl trl` run against.
# torch==2.13.0 goes in first (the local CPU build); any other torch pin pulls a CUDA build (see
# shared/ENVIRONMENT.md), so the script fails if a CUDA wheel or another torch shows up. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/peer_venv.sh
make_venv "${RLFLEET_TRL_VENV:-.venv-trl}"
# accelerate and datasets pinned to the releases current when TRL v0.11.4 shipped (October 2024).
pip_install torch==2.13.0 trl==0.11.4 transformers==4.45.2 accelerate==1.0.1 datasets==3.0.1 \
    rich safetensors tokenizers numpy
check_no_cuda
"$PY" - <<'PY'
import torch, transformers, trl
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, f"CUDA torch installed: {torch.version.cuda}"
assert transformers.__version__ == "4.45.2", transformers.__version__
assert trl.__version__ == "0.11.4", trl.__version__
print(f"{torch.__version__=} {transformers.__version__=} {trl.__version__=}")
PY
