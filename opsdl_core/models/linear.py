"""Linear layers on the CPU through oneDNN: the same products as ``F.linear``, at the CPU's own speed.

On an x86 CPU, ``F.linear`` in float32 goes to the MKL that PyTorch ships. On the AMD EPYC (Zen 5, AVX-512)
of the measurements, that MKL runs its float32 products at about half of what the same CPU does through
oneDNN, which PyTorch ships too (``torch.ops.mkldnn._linear_pointwise``): 165–190 against 300–400 GFLOP/s
at the prompt's shapes on two threads, forward and both backward products alike
(``benchmarks/bench_linear.py`` prints both per shape on the machine it runs on). At a decode step's few
rows the product is a weight read, and there the weight in oneDNN's own blocked layout (packed once,
:func:`packed_weight`) reads at 2–3x the speed of any form of the plain one.

:class:`CpuLinear` is an ``nn.Linear`` whose forward, on the CPU in float32 (no autocast), computes
``x Wᵀ`` through oneDNN: from a packed copy of the weight when no gradient is needed and the call has at most
:attr:`CpuLinear.packed_rows` rows (a decode step, a greedy evaluation's steps); from the plain weight
otherwise, in an autograd function whose backward runs oneDNN too. Everything else (another device or
dtype, autocast, a build without oneDNN, a sharded weight) is ``F.linear`` unchanged. The products add the
same terms in another order: outputs agree with ``F.linear``'s to float32 rounding (~1e-6 relative),
gradients too (tests). The weights, the state dict, LoRA wrapping (PEFT sees an ``nn.Linear``), merging and
saving are untouched: only the class of each module changes.

A packed copy costs the weight's size again in memory, only for layers that decode without gradient. It is
rebuilt when the weight changes (another tensor, or an in-place write: ``Tensor._version``), so a sampler
synced in place, an optimizer step or a loaded state dict never leaves a stale copy.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this PyTorch runs float32 linear products through oneDNN (an x86/ARM CPU build with mkldnn)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3), 4)
        y = ops._linear_pointwise(torch.ones(4, 3), w, None, "none", [], "")
        z = ops._linear_pointwise(torch.ones(4, 3), torch.ones(2, 3), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.equal(y, torch.full((4, 2), 3.0)) and torch.equal(z, y))


def _dnn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [rows, in] @ wᵀ`` by oneDNN; ``w [out, in]`` plain (any strides) or packed."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``x Wᵀ`` with both backward products (``g W``, ``gᵀ x``) through oneDNN as well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return _dnn(x, weight)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        gx = _dnn(g, weight.t()) if ctx.needs_input_grad[0] else None
        gw = _dnn(g.t(), x.t()) if ctx.needs_input_grad[1] else None
        return gx, gw


# module -> (the weight it was packed from, its data pointer, its version, the packed copy)
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_weight(module: nn.Linear) -> torch.Tensor:
    """``module.weight`` in oneDNN's blocked layout, packed on first use and again whenever the weight changed."""
    w = module.weight
    entry = _PACKED.get(module)
    if entry is not None and entry[0]() is w and entry[1] == w.data_ptr() and entry[2] == w._version:
        return entry[3]
    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), CpuLinear.packed_rows)
    _PACKED[module] = (weakref.ref(w), w.data_ptr(), w._version, packed)
    return packed


def drop_packed(model: nn.Module) -> int:
    """Free the packed weight copies of ``model``'s layers (rebuilt on the next decode). Returns how many."""
    n = 0
    for m in model.modules():
        if _PACKED.pop(m, None) is not None:
            n += 1
    return n


class CpuLinear(nn.Linear):
    """An ``nn.Linear`` that computes through oneDNN on the CPU in float32 (see the module's docstring)."""

    packed_rows = 32  # at most this many rows without gradient: the packed weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type != "cpu" or w.dtype != torch.float32 or x.dtype != torch.float32 or x.dim() == 0
                or type(w) not in (nn.Parameter, torch.Tensor) or w.layout != torch.strided or w.dim() != 2
                or torch.is_autocast_enabled("cpu") or not onednn_available() or w.is_inference()):
            return F.linear(x, w, self.bias)
        width = x.shape[-1]
        rows = x.numel() // width if width else 0
        if rows == 0:
            return F.linear(x, w, self.bias)
        x2 = x.reshape(rows, width).contiguous()
        grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        if not grad and rows <= self.packed_rows:
            y = _dnn(x2, packed_weight(self))
        elif not grad:
            y = _dnn(x2, w)
        else:
            y = _OneDNNLinear.apply(x2, w)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], w.shape[0])


def use_cpu_linear(model: Any) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the oneDNN forward, in place (subclasses and other layer
    types are left alone). Returns the number of layers switched."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CpuLinear
            n += 1
    return n
