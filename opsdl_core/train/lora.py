"""The trainable weights and their learning rate: LoRA adapters (PEFT) or every weight, the adapter
config saved in a canonical form, and the learning-rate schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig
from ..models.linear import CpuLinear
from .checkpoint import atomic_write_text

__all__ = ["apply_lora", "canonical_adapter_config", "fuse_lora_forward", "lr_lambda"]


def apply_lora(model: Any, cfg: RunConfig) -> Any:
    """Wrap ``model`` with LoRA adapters (PEFT) when enabled; otherwise train every weight."""
    if not cfg.lora.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    fuse_lora_forward(peft_model)
    return peft_model


def fuse_lora_forward(peft_model: Any) -> int:
    """Give each plain LoRA ``Linear`` of ``peft_model`` a forward that adds the adapter inside the second
    matmul: ``y = x W^T`` then ``y += s * (x A^T) B^T`` in one ``addmm_``, instead of PEFT's
    ``y + B(A(x)) * s``, which writes the ``[tokens, out]`` product, scales it and adds it (three passes
    over a tensor as large as the layer's output, and the scaling's own pass in the backward). The same
    function of the same parameters; any call the fused form does not cover (adapter disabled or merged,
    several adapters, dropout, DoRA and other variants, a bias on B, other dtypes or layer kinds) goes to
    PEFT's forward. Returns the number of layers given it."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in peft_model.modules():
        if type(module) is LoraLinear and type(module.base_layer) in (torch.nn.Linear, CpuLinear):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
            or torch.is_autocast_enabled(x.device.type)
            or name in self.lora_variant or not isinstance(self.lora_dropout[name], torch.nn.Identity)):
        return type(self).forward(self, x, *args, **kwargs)
    A, B, W = self.lora_A[name], self.lora_B[name], self.base_layer
    if B.bias is not None or A.bias is not None or not (x.dtype == A.weight.dtype == B.weight.dtype == W.weight.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    x2 = x.reshape(-1, x.shape[-1])
    y = W(x2)  # x W^T (+ bias): through oneDNN on the CPU (CpuLinear)
    y.addmm_(torch.mm(x2, A.weight.t()), B.weight.t(), alpha=self.scaling[name])
    return y.view(*x.shape[:-1], y.shape[-1])


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
