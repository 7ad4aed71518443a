"""The trainable weights and their learning rate: LoRA adapters (PEFT) or every weight, the adapter
config saved in a canonical form, and the learning-rate schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig
from .checkpoint import atomic_write_text

__all__ = ["apply_lora", "canonical_adapter_config", "lr_lambda"]


def apply_lora(model: Any, cfg: RunConfig) -> Any:
    """Wrap ``model`` with LoRA adapters (PEFT) when enabled; otherwise train every weight."""
    if not cfg.lora.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def canonical_adapter_config(path: Path) -> None:
    """PEFT writes ``target_modules`` from a set, in an order that changes between processes;
    sort it so the same adapter always has the same bytes (and content hash)."""
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    atomic_write_text(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
