#!/usr/bin/env bash
# Creates .venv-verl: veRL 0.9.1 installed with --no-deps, plus only what
# `verl.trainer.ppo.core_algos` needs to import (its package __init__ pulls in ray, tensordict,
# transformers and omegaconf), the reference implementation that
# tests/algorithms/critic_free_reference/make_verl_reference.py runs against. veRL's full dependency
# set (vllm, flash-attn, a CUDA torch...) is neither needed nor installable here.
# torch==2.13.0 goes in first (the local CPU build); the script fails if a CUDA wheel or another
# torch shows up. tensordict goes in with --no-deps too: its only torch requirement is unpinned,
# and 0.10.0 is the newest release veRL 0.9.1 accepts. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/peer_venv.sh
make_venv "${RLFLEET_VERL_VENV:-.venv-verl}"
pip_install --no-deps verl==0.9.1 tensordict==0.10.0
# Import-time dependencies of verl.trainer.ppo.core_algos (verl/__init__.py, verl/protocol.py,
# verl/utils/torch_functional.py, verl/utils/profiler), at the versions the data was made with.
pip_install torch==2.13.0 packaging numpy omegaconf==2.4.0 ray==2.60.0 transformers==5.10.4 \
    codetiming==1.4.0 cloudpickle importlib_metadata orjson "pyvers>=0.1.0,<0.2.0" safetensors
check_no_cuda
"$PY" - <<'PY'
import torch, verl
from verl.trainer.ppo import core_algos  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, f"CUDA torch installed: {torch.version.cuda}"
assert verl.__version__ == "0.9.1", verl.__version__
print(f"{torch.__version__=} {verl.__version__=}")
PY
