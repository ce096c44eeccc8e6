#!/usr/bin/env bash
# Submits the demo job to a running Ray cluster, from the repository root:
#   deploy/ray/submit_demo.sh http://HOST:8265 [--set iterations=5 ...]
# The model directory named in the config must exist on the cluster, or be inside the uploaded
# working dir (artifacts/demo-model is: build it first with `rlfleet tiny-model artifacts/demo-model
# --pretrain`). Token auth (Ray 2.60's default): the token comes from RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. The same job with Ray's own CLI:
#   RAY_AUTH_MODE=token ray job submit --address http://HOST:8265 --working-dir . \
#       --runtime-env deploy/ray/runtime_env.yaml -- rlfleet train --config examples/demo.yaml
set -euo pipefail
cd "$(dirname "$0")/../.."
ADDRESS=${1:?usage: $0 http://HOST:8265 [rlfleet submit arguments]}
shift
exec rlfleet submit --address "$ADDRESS" --config examples/demo.yaml \
    --runtime-env deploy/ray/runtime_env.yaml "$@"
