"""The run's final folder: ``final/adapter`` (LoRA) and ``final/model``, a standard transformers folder with
the adapter merged in, and ``final/lineage.json``; built in ``.tmp-final`` and renamed into place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..run_dir import RunDir
from .checkpoint import atomic_write_text
from .lora import canonical_adapter_config


def write_final(run_dir: Path, model: Any, tokenizer: Any, *, merged: bool, lora: bool,
                lineage: dict[str, Any], adapter_state: dict[str, Any] | None = None,
                model_state: dict[str, Any] | None = None) -> Any:
    """Write ``run_dir/final`` from ``model``. Without states, from the model itself, the adapter merged into it in
    place (``merge_and_unload``; the merged model is returned: faster to evaluate). With them (gathered from
    shards under FSDP): ``adapter_state`` the model's whole state dict, ``model_state`` the plain model's
    weights with ``W + BA`` merged in; the model is returned as it was."""
    tmp, final = Path(run_dir) / ".tmp-final", RunDir(run_dir).final
    if tmp.exists():
        shutil.rmtree(tmp)
    out = model
    if lora:
        model.save_pretrained(tmp / "adapter", **({"state_dict": adapter_state} if adapter_state is not None else {}))
        canonical_adapter_config(tmp / "adapter" / "adapter_config.json")
        if merged and model_state is None:
            out = model = model.merge_and_unload()
        elif merged:
            model = model.get_base_model()
    if merged or not lora:
        model.save_pretrained(tmp / "model", **({"state_dict": model_state} if model_state is not None else {}))
        tokenizer.save_pretrained(tmp / "model")
    atomic_write_text(tmp / "lineage.json", json.dumps(lineage, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return out
