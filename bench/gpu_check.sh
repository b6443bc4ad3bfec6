#!/usr/bin/env bash
# One-shot GPU check (issue 16, item 9; bench/gpu_check.py says what it measures). On a bare GPU
# machine, from the repository root:
#     bash bench/gpu_check.sh            # extra arguments go to bench/gpu_check.py
# Uses .venv if it already has the pinned torch and the bench peers; otherwise creates
# .venv-gpu-check and installs requirements-bench.txt (which includes requirements.txt) from PyPI,
# torch and torchvision held at the pinned versions. Whole run: under 8 minutes on one H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: bench/gpu_check.sh needs an NVIDIA GPU (nvidia-smi finds none); for a CPU dry run use" \
         "'python bench/gpu_check.py --device cpu --tiny'" >&2
    exit 2
fi
nvidia-smi -L

PYTHON_BIN="${PYTHON:-python3}"
venv_ready() {
    "$1/bin/python" -c "import torch, torchvision, determined, byol_pytorch, lightly" >/dev/null 2>&1
}
if [ -x .venv/bin/python ] && venv_ready .venv; then
    VENV=.venv
else
    VENV=.venv-gpu-check
    if ! venv_ready "$VENV"; then
        echo "[gpu_check] installing requirements into $VENV" >&2
        "$PYTHON_BIN" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -r requirements-bench.txt -c requirements.txt
    fi
fi
exec "$VENV/bin/python" bench/gpu_check.py "$@"
