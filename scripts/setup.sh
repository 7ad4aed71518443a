#!/usr/bin/env bash
# Create .venv (if missing) and install opsdl with its pinned dependencies. Idempotent: a second
# run only checks what is installed. Torch is installed first, from the version named below, so
# that no other requirement can pull a multi-GB CUDA build onto a CPU machine.
#   PYTHON=python3.11 scripts/setup.sh         # choose the interpreter
#   OPSDL_SKIP_TORCH=1 scripts/setup.sh        # keep a torch you installed yourself (e.g. a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if [ -z "${OPSDL_SKIP_TORCH:-}" ]; then
  pip_install "torch==2.13.0"
fi
pip_install -c constraints.txt -e ".[dev]"
