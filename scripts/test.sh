#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, the slow end-to-end tests included.
# The web-UI test needs a headless Chromium: on Debian as root it is installed here
# (apt-get install chromium); elsewhere install it yourself or that one test is skipped.
#   scripts/test.sh -m "not slow"     # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing chromium for the web-UI test (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
    || echo "[test] WARNING: could not install chromium; the headless-browser test will be skipped"
fi
if command -v chromium >/dev/null 2>&1; then export OPSDL_REQUIRE_BROWSER=1; fi
# setup.sh installed vLLM (unless OPSDL_VLLM=none): its tests then run, a broken install fails them
if [ "${OPSDL_VLLM:-cpu}" != none ]; then export OPSDL_REQUIRE_VLLM=1; fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/python -m pytest -q "$@"
