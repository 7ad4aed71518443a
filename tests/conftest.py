"""Shared pytest fixtures and the test process's settings.

Thread settings are chosen on purpose, before torch is imported: the fast tests use tiny
models, where one intra-op thread is fastest and cannot busy-wait against another process;
OpenMP threads sleep when idle (PASSIVE). No test reaches a model hub.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model folder (seed 0), readable by ``load_model_and_tokenizer`` and
    ``AutoModelForCausalLM/AutoTokenizer.from_pretrained``. Shared by the session: do not modify it."""
    from opsdl_core.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)


@pytest.fixture
def tiny_model_and_tokenizer():
    """A fresh ``(model, tokenizer)`` pair from ``build_tiny_model(seed=0)``; safe to modify."""
    from opsdl_core.models.tiny import build_tiny_model

    return build_tiny_model(seed=0)
