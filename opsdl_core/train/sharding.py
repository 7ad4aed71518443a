"""The trainer's weights under FSDP2 (``torch.distributed.fsdp.fully_shard``, as accelerate prepares them):
each rank holds a shard of every parameter (a ``DTensor``) outside a module's forward and backward.

What reads or writes whole weights outside the forward — the merged sampler's sync, the vLLM engine's
weights, the final model, a checkpoint's weights and AdamW state — goes through this module: on sharded
models it gathers (a collective: every rank must call it, at the same point), elsewhere it is the plain
tensors' own path, unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..models.sharded import fsdp_units, is_sharded

__all__ = ["check_fsdp_plugin", "cpu_copy", "full_state", "full_weights", "grad_norm_value", "is_sharded",
           "load_optimizer_state", "load_trainable_state", "optimizer_state", "trainable_state"]


def check_fsdp_plugin(plugin: Any) -> None:
    """Refuse FSDP's own activation checkpointing (``fsdp_activation_checkpointing`` in the launch file): it wraps
    each decoder layer in torch's checkpoint, whose recompute in the backward appends the layer's keys and
    values to the KV cache a second time, and the answers are scored on that cache (an attention-shape error
    in the first backward). ``train.gradient_checkpointing`` recomputes the same layers with the cache kept."""
    if plugin is not None and getattr(plugin, "activation_checkpointing", False):
        raise ValueError("fsdp_activation_checkpointing: true in the accelerate launch file cannot work with the "
                         "trainer (its recompute extends the prompt's KV cache a second time): set it to false and "
                         "use train.gradient_checkpointing: true, which checkpoints the same layers with the cache "
                         "kept")


@contextlib.contextmanager
def full_weights(model: Any) -> Iterator[None]:
    """Inside the block every parameter of ``model`` is its whole tensor (FSDP2's ``unshard``: all-gathered, the
    module slots pointing at the gathered tensors), resharded after. A no-op on a model that is not sharded.
    Every rank must enter it together."""
    units = fsdp_units(model)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU, gathered from the shards (every rank must call it; with
    ``cpu_offload`` torch hands the whole tensors to rank 0 only, the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies on the CPU that outlive :func:`full_weights` (the gathered tensors' storage is freed on exit)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def trainable_state(model: Any, full: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The trainable parameters' whole tensors by name: the parameters themselves (detached, no copy) on a model
    that is not sharded; on a sharded one taken from ``full`` (:func:`full_state`, gathered here if not given:
    CPU copies on rank 0, empty on the other ranks)."""
    if not is_sharded(model):
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t for n, t in (full_state(model) if full is None else full).items() if n in names}


def load_trainable_state(model: Any, weights: dict[str, torch.Tensor]) -> None:
    """Write whole tensors (by name) into the model's parameters; on sharded models each rank keeps its shard."""
    if not is_sharded(model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, weights, options=_options(strict=False))


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state to save: torch's own ``state_dict()``, or on sharded models the whole state keyed
    by parameter name (``torch.distributed.checkpoint``'s full optimizer state dict, gathered to rank 0)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


def grad_norm_value(norm: Any) -> float:
    """A gradient norm as a float (FSDP2's clipping returns a replicated ``DTensor``)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)
