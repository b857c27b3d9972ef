#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install protein_lm with its dev tools.
#
# Why a script: the README promises two commands on a fresh machine, and both must install what
# they need. PyTorch is pinned only when it is not already importable: on a CPU-only box
# (and in CI) `torch==2.13.0` resolves to the CPU build; on a Linux GPU machine the same pin is the
# normal CUDA build from PyPI. Set TORCH_SPEC to choose another build, VENV to another location,
# or PROTEIN_LM_NO_VENV=1 to install into the current interpreter (e.g. a conda env).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ "${PROTEIN_LM_NO_VENV:-0}" != "1" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
else
  PY="$PYTHON"
fi

stamp="$VENV/.protein_lm_installed"
# Reinstall only when the dependency list changed (keeps `make test` fast on repeat runs).
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ "${PROTEIN_LM_NO_VENV:-0}" != "1" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  "$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
fi
echo "[setup] installing protein_lm and its dependencies"
"$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
if [ "${PROTEIN_LM_NO_VENV:-0}" != "1" ]; then echo "$want" > "$stamp"; fi
"$PY" -c "import torch, pytorch_lightning, Bio; print(f'[setup] ok: torch {torch.__version__} (cuda={torch.cuda.is_available()}), lightning {pytorch_lightning.__version__}')"
