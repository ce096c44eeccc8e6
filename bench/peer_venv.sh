# Sourced by the bench/setup_*_venv.sh scripts: a peer's reference virtualenv next to .venv.
# torch==2.13.0 goes in first (the local CPU build); any other torch pin pulls a CUDA build (see
# shared/ENVIRONMENT.md), so `check_no_cuda` fails the script if a CUDA wheel shows up.

# make_venv DIR: creates DIR unless it exists, sets PY, upgrades pip and installs torch 2.13.0.
make_venv() {
    VENV=$1
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    PY="$VENV/bin/python"
    pip_install --upgrade pip
    pip_install torch==2.13.0
}

# pip_install ARGS...: quiet pip; drops the warnings about this machine's unused extra index
# paths and, for --no-deps installs, pip's notes that deliberately missing dependencies are missing.
pip_install() {
    "$PY" -m pip install -q "$@" 2>&1 | {
        grep -vE "^WARNING: Location|^[a-z0-9_-]+ .* requires .*, which is not installed|dependency resolver does not" || true
    }
}

check_no_cuda() {
    if "$PY" -m pip list --format=freeze | grep -iE '^(nvidia-|triton==)'; then
        echo "error: CUDA packages were pulled into $VENV" >&2
        exit 1
    fi
}
