#!/usr/bin/env bash
# Create .venv and install derta with its test/bench extras.
#   CPU-only machines: a CPU build of torch is installed first so nothing pulls a multi-GB CUDA build.
#   GPU machines:      DERTA_TORCH=cuda scripts/setup.sh   (plain `pip install torch`, the CUDA build)
#   Any other build:   DERTA_TORCH_SPEC="torch==2.5.1" TORCH_INDEX_URL=<your index> scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if [ "${DERTA_TORCH:-cpu}" = "cuda" ]; then
    pip install -q torch
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip install -q "${DERTA_TORCH_SPEC:-torch}" --index-url "$TORCH_INDEX_URL"
  else
    # 2.13.0's CPU build is what this project's CI machines keep locally; elsewhere set TORCH_INDEX_URL
    # to PyTorch's CPU wheel index to get a CPU build.
    pip install -q "${DERTA_TORCH_SPEC:-torch==2.13.0}"
  fi
fi
# setuptools warns on every editable install that the `derta/` folder shadows the package (that is the point)
PYTHONWARNINGS=ignore::UserWarning pip install -q -e ".[dev]"
python -c "import torch, ray, transformers; print(f'derta env ready: torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}')"
