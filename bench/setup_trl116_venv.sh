#!/usr/bin/env bash
# Creates .venv-trl116: TRL 1.16.0 (GRPOTrainer, RLOOTrainer) with the transformers, accelerate and
# datasets it resolves to, the reference implementation that
# tests/algorithms/critic_free_reference/make_trl_reference.py runs against.
# torch==2.13.0 goes in first (the local CPU build); any other torch pin pulls a CUDA build (see
# shared/ENVIRONMENT.md), so the script fails if a CUDA wheel or another torch shows up. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/peer_venv.sh
make_venv "${RLFLEET_TRL116_VENV:-.venv-trl116}"
# The versions TRL 1.16.0 resolved to when the reference data was made (November 2026).
pip_install torch==2.13.0 trl==1.16.0 transformers==5.24.0 accelerate==1.15.0 datasets==5.2.0 \
    safetensors tokenizers numpy
check_no_cuda
"$PY" - <<'PY'
import accelerate, datasets, torch, transformers, trl
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, f"CUDA torch installed: {torch.version.cuda}"
assert trl.__version__ == "1.16.0", trl.__version__
assert transformers.__version__ == "5.24.0", transformers.__version__
assert accelerate.__version__ == "1.15.0", accelerate.__version__
assert datasets.__version__ == "5.2.0", datasets.__version__
print(f"{torch.__version__=} {transformers.__version__=} {trl.__version__=}")
PY
