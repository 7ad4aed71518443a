"""Linear layers fed a few rows (decoding) on the CPU: ``W @ xᵀ`` instead of ``x @ Wᵀ``.

A decode step runs every linear layer on a handful of rows (one token per sequence, or the ``n`` samples
of a packed prompt). ``F.linear`` hands the CPU BLAS the product ``x [rows, in] @ Wᵀ``; on the 2-core
AMD EPYC (AVX2) of the measurements, with the MKL that PyTorch 2.13 ships, that product streams the
weight at 2–2.5 GB/s for 2–32 rows, while the same numbers computed as ``W @ xᵀ`` (the weight as the
untransposed left operand, the rows as a narrow right-hand side) stream it at 4–7 GB/s: 0.37–0.58 of the
time at 4 rows, the LM head of SmolLM2-135M 45 → 17 ms (``benchmarks/bench_linear.py`` prints both forms
per shape and row count on the machine it runs on). At one row both are a matrix-vector product; from
~100 rows on, with a backward pass, ``F.linear`` is as fast or faster. So only 2..``max_rows`` rows take
the other form; everything else, and every other device or dtype, is ``F.linear`` unchanged.

The two forms add the same products in a different order: outputs agree to float rounding (~1e-7
relative), gradients too (autograd differentiates either; tests). The weights, the state dict, LoRA
wrapping (PEFT sees an ``nn.Linear``), merging and saving are untouched: only the class of each module
changes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class FewRowsLinear(nn.Linear):
    """An ``nn.Linear`` whose forward computes ``W @ xᵀ`` for 2..``max_rows`` rows of float32 on the CPU."""

    max_rows = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.device.type != "cpu" or w.dtype != torch.float32 or x.dtype != torch.float32 or x.dim() == 0:
            return F.linear(x, w, self.bias)
        width = x.shape[-1]
        rows = x.numel() // width if width else 0
        if not 1 < rows <= self.max_rows:
            return F.linear(x, w, self.bias)
        y = torch.mm(w, x.reshape(rows, width).t()).t().contiguous()  # [rows, out]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], w.shape[0])


def use_few_rows_linear(model: Any) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the few-rows forward, in place (subclasses and other
    layer types are left alone). Returns the number of layers switched."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowsLinear
            n += 1
    return n
