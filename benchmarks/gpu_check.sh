#!/usr/bin/env bash
# The GPU check in one line, on the lent GPU machine (only the working tree travels; results go to $OUT):
#   bash benchmarks/gpu_check.sh
# Wheels in .whl/ (git-ignored; `make gpu-wheels` fills it here) are installed into a temporary folder first, for
# what the machine lacks (pytest for the kernel tests); the machine's own torch / transformers / triton are used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
SITE="$(mktemp -d)"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
fi
PYTHONPATH="src:$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/gpu_check.py --out "${OUT:-runs/gpu-check}" "$@"
