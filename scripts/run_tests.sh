#!/usr/bin/env bash
# Run the test suite in .venv. pytest's exit code passes through unchanged, so "no tests
# collected" (exit 5) fails like any other failure. Skips are listed with their reasons (-rs).
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/metabolic/torch_extensions}
export PYTHONUNBUFFERED=1
.venv/bin/python -m pytest -q -rs --durations=15 "$@"
code=$?
if [ $code -eq 5 ]; then
  echo "run_tests: pytest collected no tests (exit 5): failing" >&2
fi
exit $code
